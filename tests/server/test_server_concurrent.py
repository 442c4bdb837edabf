"""Concurrent explanations through a real TorchServe (``asyncCommunication: true``):
predictions that arrive while the worker explains are answered before it ends,
with the same answers as the synchronous model, exact statuses, and no request lost."""
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import build_text_mar, has_internals

pytestmark = pytest.mark.server
LABELS = {"negative", "neutral", "positive"}
LONG = " ".join(["the staff were rude but the soup was great"] * 6)
SLOW = {"data": LONG, "n_steps": 1024}  # seconds of Layer IG on the tiny model (internal batches of 8)
SECRET = "concurrent-audit-secret"
EXPLAIN = {"n_steps": 16, "max_n_steps": 1024, "cache_mb": 0, "internal_batch_size": 8}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tsexplain.tools.launcher import TorchServe

    tmp = tmp_path_factory.mktemp("concurrent")
    build_text_mar(tmp, "conc", config={"asyncCommunication": True, "batchSize": 1, "explain": EXPLAIN})
    build_text_mar(tmp, "sync", config={"batchSize": 1, "explain": EXPLAIN})  # the same seeded weights
    env = {"TSEXPLAIN_SMALL_ASYNC_MAX_QUEUED": "1",
           # README's worked example, "explain only audit traffic, token-protected", set by environment
           "TSEXPLAIN_AUDITED_POLICY": "priority", "TSEXPLAIN_AUDITED_PRIORITY_VALUES": "[audit]",
           "TSEXPLAIN_AUDITED_ON_DENIED": "predict", "TSEXPLAIN_AUDITED_TOKEN_ENV": "AUDIT_TEST_SECRET",
           "AUDIT_TEST_SECRET": SECRET}
    models = {"conc": "conc.mar", "sync": "sync.mar", "small": "conc.mar", "audited": "conc.mar"}
    with TorchServe(tmp / "store", models, tmp / "ts", env=env) as ts:
        yield ts


def call(server, path, body, content_type="application/json", headers=None):
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    status, raw = server.request("POST", server.inference_url + path, body,
                                 {"Content-Type": content_type, **(headers or {})}, timeout=300)
    return {"status": status, "body": json.loads(raw), "done": time.monotonic()}


def predictions_during_an_explanation(server, model, count=4, headers=None):
    """A slow explanation, then ``count`` predictions one after another while it runs."""
    explanation = {}
    worker = threading.Thread(target=lambda: explanation.update(
        call(server, f"/explanations/{model}", SLOW, headers=headers)))
    worker.start()
    time.sleep(0.5)  # it has reached the worker
    predictions = [call(server, f"/predictions/{model}", f"prediction number {j}".encode(), "text/plain")
                   for j in range(count)]
    worker.join(timeout=300)
    return explanation, predictions


def test_predictions_do_not_wait_for_the_explanation(server):
    explanation, predictions = predictions_during_an_explanation(server, "conc")
    assert explanation["status"] == 200 and explanation["body"]["explanation"]["n_steps"] == 1024
    for prediction in predictions:
        assert prediction["status"] == 200 and set(prediction["body"]) == LABELS
        assert prediction["done"] < explanation["done"]


def test_without_async_they_queue_behind_it(server):
    """The control: the same model served synchronously answers them after the explanation."""
    explanation, predictions = predictions_during_an_explanation(server, "sync", count=2)
    assert explanation["status"] == 200
    assert all(p["status"] == 200 and p["done"] > explanation["done"] for p in predictions)


def test_answers_equal_the_synchronous_model(server):
    texts = ["the soup was cold", "a lovely evening with great music", "rude staff"]
    for text in texts:
        concurrent = call(server, "/predictions/conc", text.encode(), "text/plain")["body"]
        assert concurrent == pytest.approx(call(server, "/predictions/sync", text.encode(), "text/plain")["body"],
                                           abs=1e-6)
    request = {"data": texts[1], "n_steps": 32}
    concurrent, synchronous = call(server, "/explanations/conc", request), call(server, "/explanations/sync", request)
    assert concurrent["status"] == synchronous["status"] == 200
    a, b = concurrent["body"]["explanation"], synchronous["body"]["explanation"]
    assert a["target"] == b["target"] and [t["token"] for t in a["tokens"]] == [t["token"] for t in b["tokens"]]
    assert [t["attribution"] for t in a["tokens"]] == pytest.approx([t["attribution"] for t in b["tokens"]], abs=1e-5)


def test_every_request_of_a_burst_gets_its_own_status(server):
    def request(i):
        if i % 7 == 0:
            return 400, call(server, "/predictions/conc", b"{not json")
        if i % 5 == 0:
            return 200, call(server, "/explanations/conc", {"data": f"text {i} was nice", "n_steps": 32})
        if i % 11 == 0:
            return 400, call(server, "/explanations/conc", {"data": "x", "n_steps": 5000})
        return 200, call(server, "/predictions/conc", f"text number {i}".encode(), "text/plain")

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(request, range(90)))
    for expected, result in results:
        assert result["status"] == expected, result
        assert not has_internals(json.dumps(result["body"]))
        if expected == 400:
            assert result["body"]["code"] == 400 and result["body"]["message"]
    assert call(server, "/predictions/conc", b"still serving", "text/plain")["status"] == 200


def test_past_async_max_queued_requests_get_503(server):
    """``small``: the same MAR with TSEXPLAIN_SMALL_ASYNC_MAX_QUEUED=1."""
    explanation, predictions = predictions_during_an_explanation(server, "small", count=2)
    assert explanation["status"] == 200
    for prediction in predictions:
        assert prediction["status"] == 503 and prediction["body"]["type"] == "overloaded", prediction
    assert call(server, "/predictions/small", b"now there is room", "text/plain")["status"] == 200


def test_the_worker_logged_concurrent_mode(server):
    deadline = time.monotonic() + 15
    while "concurrent explanations (asyncCommunication)" not in server.log_text():
        assert time.monotonic() < deadline, "no log line for the concurrent mode"
        time.sleep(0.5)


def test_audit_traffic_only_token_protected(server):
    """README's worked example with asyncCommunication, tried as a user would."""
    plain = call(server, "/explanations/audited", {"data": "the soup was cold"})
    assert plain["status"] == 200 and plain["body"]["explanation"] is None and plain["body"]["explanation_skipped"]
    wrong = call(server, "/explanations/audited", {"data": "the soup was cold"},
                 headers={"X-Priority": "audit", "X-Explain-Token": "not-it"})
    assert wrong["status"] == 200 and wrong["body"]["explanation"] is None
    explanation, predictions = predictions_during_an_explanation(
        server, "audited", headers={"x-priority": "AUDIT", "X-Explain-Token": SECRET})
    assert explanation["status"] == 200 and explanation["body"]["explanation"]["n_steps"] == 1024
    assert all(p["status"] == 200 and p["done"] < explanation["done"] for p in predictions)
    log = server.log_text()
    assert SECRET not in log and "not-it" not in log
