"""Explanation access control through a real TorchServe.

One tiny text MAR is registered under several names; per-model environment
overrides (TSEXPLAIN_<MODEL>_<KEY>) give each name its own policy, so the
environment path is exercised by every test here.
"""
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import build_text_mar, has_internals

pytestmark = pytest.mark.server
SECRET = "correct-horse-battery-staple"
COMBOS = [(policy, denied) for policy in ("all", "priority", "off") for denied in ("predict", "reject")]


def model_name(policy, denied):
    return f"{policy}_{denied}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tsexplain.tools.launcher import TorchServe

    tmp = tmp_path_factory.mktemp("policy")
    build_text_mar(tmp, "tiny", config={"batchSize": 8, "maxBatchDelay": 300, "explain": {"policy": "all"}})
    models = {model_name(p, d): "tiny.mar" for p, d in COMBOS}
    models.update({"guarded": "tiny.mar", "capped": "tiny.mar", "strict": "tiny.mar"})
    env = {"EXPLAIN_SECRET": SECRET}
    for policy, denied in COMBOS:
        prefix = f"TSEXPLAIN_{model_name(policy, denied).upper()}_"
        env.update({prefix + "POLICY": policy, prefix + "ON_DENIED": denied})
    env.update({"TSEXPLAIN_GUARDED_POLICY": "priority", "TSEXPLAIN_GUARDED_TOKEN_ENV": "EXPLAIN_SECRET",
                "TSEXPLAIN_GUARDED_ON_DENIED": "predict", "TSEXPLAIN_GUARDED_PRIORITY_HEADER": "X-Tier",
                "TSEXPLAIN_GUARDED_PRIORITY_VALUES": "[gold, audit]",
                "TSEXPLAIN_CAPPED_MAX_PER_BATCH": "1", "TSEXPLAIN_CAPPED_ON_DENIED": "reject",
                "TSEXPLAIN_STRICT_ROUTES": "[explanations]"})
    with TorchServe(tmp / "store", models, tmp / "ts", env=env) as ts:
        yield ts


def post(server, route, model, text="the soup was great", headers=None, url=None):
    url = url or f"{server.inference_url}/{route}/{model}"
    status, raw = server.request("POST", url, text.encode(), {"Content-Type": "text/plain", **(headers or {})})
    return status, json.loads(raw)


@pytest.mark.parametrize("policy,denied", COMBOS)
def test_policy_and_on_denied(server, policy, denied):
    name = model_name(policy, denied)
    for headers, is_priority in [({}, False), ({"X-Priority": "high"}, True)]:
        status, body = post(server, "explanations", name, headers=headers)
        allowed = policy == "all" or (policy == "priority" and is_priority)
        if allowed:
            assert status == 200 and body["explanation"]["method"] == "layer_ig"
        elif denied == "predict":
            assert status == 200 and body["explanation"] is None and body["explanation_skipped"]
            assert {p["label"] for p in body["predictions"]} == {"negative", "neutral", "positive"}
        else:
            assert status == 403 and body["type"] == "explanation_denied" and body["message"]
    status, body = post(server, "predictions", name)
    assert status == 200 and "explanation" not in body


def test_token_missing_wrong_right_and_header_case(server):
    cases = [
        ({"X-Tier": "gold"}, False),  # no token
        ({"X-Tier": "gold", "X-Explain-Token": "wrong"}, False),
        ({"X-Explain-Token": SECRET}, False),  # token, not priority
        ({"x-tier": "GOLD", "x-explain-token": SECRET}, True),
        ({"X-TIER": "audit", "X-EXPLAIN-TOKEN": SECRET}, True),
    ]
    for headers, allowed in cases:
        status, body = post(server, "explanations", "guarded", headers=headers)
        assert status == 200
        assert (body["explanation"] is not None) is allowed, headers
    status, raw = server.request("POST", f"{server.inference_url}/explanations/guarded",
                                 json.dumps({"data": "ok", "priority": "gold"}).encode(),
                                 {"Content-Type": "application/json", "X-Explain-Token": SECRET})
    assert status == 200 and json.loads(raw)["explanation"] is not None
    assert_not_in_outputs(server, [SECRET])


def assert_not_in_outputs(server, needles):
    """None of ``needles`` in any log file of the server nor in its captured stdout/stderr."""
    time.sleep(2)  # let the frontend flush its log appenders
    outputs = server.output_files()
    assert {"logs/model_log.log", "logs/access_log.log", "logs/ts_log.log", "torchserve.out"} <= set(outputs)
    for needle in needles:
        for path, text in outputs.items():
            assert needle not in text, (needle, path)


def test_nothing_sensitive_in_logs_or_captured_output(server):
    """Tokens (right and wrong), the text and attribution values appear in no log
    file and not in the captured output; error bodies carry no internals."""
    text = "the quokka zanzibar marmalade review number 7391"
    wrong = "wrong-token-5be1d3f0"
    status, body = post(server, "explanations", "guarded", text=text, headers={"X-Tier": "gold", "X-Explain-Token": SECRET})
    assert status == 200 and body["explanation"] is not None
    explanation = body["explanation"]
    status, denied = post(server, "explanations", "guarded", text=text, headers={"X-Tier": "gold", "X-Explain-Token": wrong})
    assert status == 200 and denied["explanation"] is None
    assert post(server, "predictions", "guarded", text=text, headers={"X-Explain-Token": wrong})[0] == 200
    status, forbidden = post(server, "explanations", "off_reject", text=text, headers={"X-Explain-Token": SECRET})
    assert status == 403 and not has_internals(json.dumps(forbidden))
    values = [v for v in (t["attribution"] for t in explanation["tokens"] + explanation["words"]) if abs(v) > 1e-6]
    assert values
    needles = [SECRET, wrong, text, "quokka zanzibar", *(repr(v) for v in values)]
    needles.append(repr(explanation["convergence_delta"]["absolute"]))
    assert_not_in_outputs(server, needles)


def test_per_batch_cap_answers_429_past_the_limit(server):
    def explain(i):
        return post(server, "explanations", "capped", text=f"review number {i}")

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(explain, range(6)))
    statuses = sorted(status for status, _ in results)
    assert set(statuses) <= {200, 429} and 429 in statuses
    assert all(body["type"] == "too_many_explanations" for status, body in results if status == 429)
    batches = [tuple(map(int, m)) for m in re.findall(r"batch size=(\d+) explained=(\d+)", server.log_text())]
    assert any(size > 1 for size, _ in batches) and all(explained <= 1 for _, explained in batches[-6:])


def test_forged_explain_headers_on_prediction_routes(server):
    """A client's own explain header never turns /predictions into an explanation;
    on the legacy routes it is indistinguishable from TorchServe's KServe explain
    marker, so the same gate applies there."""
    u = server.inference_url
    for headers in ({"explain": "True"}, {"Explain": "True"}):
        status, body = post(server, None, None, headers=headers, url=f"{u}/predictions/guarded")
        assert status == 200 and "explanation" not in body
    legacy = [f"{u}/invocations?model_name=guarded", f"{u}/models/guarded/invoke", f"{u}/guarded/predict"]
    for url in legacy:
        status, body = post(server, None, None, headers={"explain": "True"}, url=url)
        assert status == 200 and body["explanation"] is None and body["explanation_skipped"]  # gate: no token
        status, body = post(server, None, None, headers={"explain": "True", "X-Tier": "gold", "X-Explain-Token": SECRET}, url=url)
        assert status == 200 and body["explanation"] is not None


def test_metrics_and_one_log_line_per_explanation(server):
    post(server, "explanations", "all_reject", text="a unique review about plums")
    post(server, "explanations", "off_reject")
    time.sleep(2)
    metrics = (server.workdir / "logs" / "model_metrics.log").read_text()
    for name in ("ExplanationsServed", "ExplanationLatency", "ExplanationsDenied"):
        assert re.search(rf"{name}\.\w+:[\d.]+\|#[^|]*Method:layer_ig", metrics), name
    log = server.log_text()
    assert "explanation method=layer_ig n_steps=" in log
    assert_not_in_outputs(server, ["plums"])


def test_routes_explanations_only(server):
    """With routes: [explanations], only /explanations explains: not the KServe
    route, not a forged header on a legacy route."""
    u = server.inference_url
    status, body = post(server, "explanations", "strict")
    assert status == 200 and body["explanation"] is not None
    for url in (f"{u}/v1/models/strict:explain", f"{u}/invocations?model_name=strict", f"{u}/strict/predict"):
        status, body = post(server, None, None, headers={"explain": "True"}, url=url)
        assert status == 403 and body["type"] == "explanation_denied", url
