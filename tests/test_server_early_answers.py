"""Early answers through a real TorchServe: predictions that share a batch with a
slow explanation are answered before it ends, on connections that stay usable."""
import http.client
import json
import re
import threading
import time
import urllib.parse

import pytest

from harness import build_text_mar

pytestmark = pytest.mark.server
SLOW = {"n_steps": 512}  # with a long text: the tiny model takes a while
LONG = " ".join(["the staff were rude but the soup was great"] * 6)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tsexplain.launcher import TorchServe

    tmp = tmp_path_factory.mktemp("early")
    build_text_mar(tmp, "tiny", config={"batchSize": 8, "maxBatchDelay": 500,
                                        "explain": {"n_steps": 16, "max_n_steps": 1024, "cache_mb": 0,
                                                    "internal_batch_size": 512}})
    env = {"TSEXPLAIN_LATE_EARLY_ANSWERS": "false", "TSEXPLAIN_CARRIED_EARLY_ANSWER_CARRIER": "explanation"}
    models = {"early": "tiny.mar", "late": "tiny.mar", "carried": "tiny.mar"}
    with TorchServe(tmp / "store", models, tmp / "ts", env=env) as ts:
        yield ts


class Client:
    """One keep-alive connection; ``call`` records when the whole answer was read."""

    def __init__(self, server):
        parts = urllib.parse.urlsplit(server.inference_url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        token = server.key("inference")
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}

    def call(self, path, body: bytes, content_type="application/json"):
        self.connection.request("POST", path, body=body, headers={"Content-Type": content_type, **self.auth})
        response = self.connection.getresponse()
        raw = response.read()
        return {"status": response.status, "headers": {k.lower(): v for k, v in response.getheaders()},
                "body": json.loads(raw), "done": time.monotonic()}

    def close(self):
        self.connection.close()


def mixed_batch(server, model, explanations, predictions=3):
    """``explanations`` (JSON bodies) sent first, then ``predictions`` plain texts, all
    within one maxBatchDelay; returns (explanation results, prediction results, clients)."""
    clients = [Client(server) for _ in range(len(explanations) + predictions)]
    results = [None] * len(clients)

    def run(i, path, body, content_type):
        results[i] = clients[i].call(path, body, content_type)

    threads = []
    for i, explanation in enumerate(explanations):
        threads.append(threading.Thread(target=run, args=(i, f"/explanations/{model}", json.dumps(explanation).encode(),
                                                          "application/json")))
    for j in range(predictions):
        threads.append(threading.Thread(target=run, args=(len(explanations) + j, f"/predictions/{model}",
                                                          f"prediction number {j}".encode(), "text/plain")))
    for thread in threads:
        thread.start()
        time.sleep(0.05)  # arrival order: the explanations first
    for thread in threads:
        thread.join(timeout=300)
    return results[:len(explanations)], results[len(explanations):], clients


def logged_batch(server, expected, timeout=15.0) -> bool:
    """Whether the handler logged a batch (size, explained, answered early) == ``expected``
    (the frontend flushes its log appenders with a delay)."""
    end = time.monotonic() + timeout
    while True:
        lines = re.findall(r"batch size=(\d+) explained=(\d+) answered_early=(\d+)", server.log_text())
        if expected in [tuple(map(int, m)) for m in lines]:
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.5)


def test_predictions_are_answered_before_the_explanation_ends(server):
    [explanation], predictions, clients = mixed_batch(server, "early", [{"data": LONG, **SLOW}])
    try:
        assert explanation["status"] == 200, explanation["body"]
        assert explanation["body"].get("explanation", {}).get("n_steps") == 512, (explanation, predictions)
        assert "transfer-encoding" not in explanation["headers"]  # a whole answer, its own status
        for prediction in predictions:
            assert prediction["status"] == 200 and set(prediction["body"]) == {"negative", "neutral", "positive"}
        # one prediction carries the batch (its answer whole in the first chunk, the stream's end with the batch)
        carriers = [p for p in predictions if p["headers"].get("transfer-encoding") == "chunked"]
        assert carriers == [predictions[-1]]
        for prediction in predictions[:-1]:
            assert prediction["done"] < explanation["done"]  # answered before the explanation ended
        assert logged_batch(server, (4, 1, 2))  # they did share one batch
        # the connections stay in step: each gets the answer to its next request
        for j, client in enumerate(clients):
            again = client.call("/predictions/early", f"prediction number {j}".encode(), "text/plain")
            assert again["status"] == 200 and set(again["body"]) == {"negative", "neutral", "positive"}
        for j, prediction in enumerate(predictions):
            alone = clients[1 + j].call("/predictions/early", f"prediction number {j}".encode(), "text/plain")
            assert alone["body"] == pytest.approx(prediction["body"], abs=1e-6)
    finally:
        for client in clients:
            client.close()


def test_an_explanation_may_carry_the_batch(server):
    [explanation], predictions, clients = mixed_batch(server, "carried", [{"data": LONG, **SLOW}])
    for client in clients:
        client.close()
    assert explanation["status"] == 200 and explanation["body"]["explanation"]["n_steps"] == 512
    assert explanation["headers"].get("transfer-encoding") == "chunked"  # its status went first, its body later
    for prediction in predictions:
        assert prediction["status"] == 200 and "transfer-encoding" not in prediction["headers"]
        assert prediction["done"] < explanation["done"]
    assert logged_batch(server, (4, 1, 3))


def test_off_by_environment(server):
    [explanation], predictions, clients = mixed_batch(server, "late", [{"data": LONG, **SLOW}])
    for client in clients:
        client.close()
    assert explanation["status"] == 200 and "transfer-encoding" not in explanation["headers"]
    assert all(p["status"] == 200 and "transfer-encoding" not in p["headers"] for p in predictions)
    assert logged_batch(server, (4, 1, 0))


def test_deadlines_after_early_answers(server):
    """By default every status is exact: explanations past their deadline get 504.
    When an explanation carries the batch, its 200 has gone out: a deadline it
    misses later is in its body; any other explanation still gets its own 504."""
    late = {"data": LONG, **SLOW, "deadline_ms": 200}
    explanations, predictions, clients = mixed_batch(server, "early", [late, {**late, "data": "a second one " + LONG}])
    for client in clients:
        client.close()
    for explanation in explanations:
        assert explanation["status"] == 504 and explanation["body"]["type"] == "deadline_exceeded"
    assert all(p["status"] == 200 for p in predictions)

    explanations, predictions, clients = mixed_batch(server, "carried", [late, {**late, "data": "another " + LONG}])
    for client in clients:
        client.close()
    carrier, other = explanations
    assert carrier["status"] == 200 and carrier["headers"].get("transfer-encoding") == "chunked"
    assert carrier["body"]["code"] == 504 and carrier["body"]["type"] == "deadline_exceeded"
    assert other["status"] == 504 and other["body"]["type"] == "deadline_exceeded"
    assert all(p["status"] == 200 and p["done"] < carrier["done"] for p in predictions)
