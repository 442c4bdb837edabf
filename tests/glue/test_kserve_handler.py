"""KServe bodies through the handler's per-request flow, in process: the gate counts
instances, plain routes keep their protocol, and explain.routes applies."""
import json

import pytest

from harness import InProcessHandler, build_text_mar, unpack

KSERVE_EXPLAIN = {"explain": "True"}  # what TorchServe sets on /v1/models/{m}:explain
EXPLANATIONS = {"explain": "True", "url_path": "explanations/tiny"}


def handler_with(tmp_path_factory, name, explain):
    tmp = tmp_path_factory.mktemp(name)
    mar = build_text_mar(tmp, "tiny", "bert", config={"explain": {"n_steps": 8, **explain}})
    return InProcessHandler(unpack(mar, tmp / "unpacked"), "text_explainer", "TextExplainer")


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    return handler_with(tmp_path_factory, "capped", {"max_per_batch": 2, "on_denied": "reject"})


def v1(*instances):
    return json.dumps({"instances": list(instances)}).encode()


def test_max_per_batch_counts_instances_across_the_batch(capped):
    (status, body), (plain_status, plain) = capped([(v1("good soup", "bad soup", "cold soup"), KSERVE_EXPLAIN),
                                                   (b"more soup", EXPLANATIONS)])
    first, second, third = body["explanations"]
    assert status == 200
    assert first["explanation"]["method"] == second["explanation"]["method"] == "layer_ig"
    assert third == {"error": third["error"], "type": "too_many_explanations", "code": 429}
    assert plain_status == 429 and plain["type"] == "too_many_explanations"


def test_instances_equal_plain_requests_in_the_same_batch(capped):
    (status, body), (_, alone) = capped([(v1({"data": "good soup", "target": "neutral"}), KSERVE_EXPLAIN),
                                         (json.dumps({"data": "good soup", "target": "neutral"}).encode(), EXPLANATIONS)])
    (entry,) = body["explanations"]
    assert status == 200 and entry["predictions"] == alone["predictions"]
    assert entry["explanation"]["words"] == alone["explanation"]["words"]


def test_kserve_predict_and_plain_routes(capped):
    [(status, body)] = capped([(v1("good soup", ""), {"explain": "False"})])
    assert status == 200 and set(body["predictions"][0]) == {"negative", "neutral", "positive"}
    assert body["predictions"][1]["type"] == "empty_text"
    # /explanations keeps its own protocol: "instances" is not one of its fields
    [(status, body)] = capped([(v1("good soup"), EXPLANATIONS)])
    assert status == 400 and body["type"] == "unknown_field"


def test_routes_explanations_only_denies_kserve_explain(tmp_path_factory):
    strict = handler_with(tmp_path_factory, "strict", {"routes": ["explanations"]})
    [(status, body)] = strict([(v1("good soup", "bad soup"), KSERVE_EXPLAIN)])
    assert status == 403 and [e["type"] for e in body["explanations"]] == ["explanation_denied"] * 2
    [(status, body)] = strict([(b"good soup", EXPLANATIONS)])
    assert status == 200 and body["explanation"]["method"] == "layer_ig"
