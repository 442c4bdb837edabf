"""The batch flow driven with a fake runner: no TorchServe, no model.

The fake runner predicts the class a text names ("a ...", "b ...", "c ..."; anything else
is a near-tie the test can flip), "explains" by recording each call, and fuses
``grad_x_input`` into its forward pass, so every path of the flow shows: parsing, the
gate, the cache and its stale hits, fused and grouped explanations, deadlines,
failures, KServe instances and the hand-over before explanation work.
"""
import json

import pytest
import torch

from tsexplain.attr.errors import EmptyText
from tsexplain.serving.cache import ExplanationCache
from tsexplain.serving.deadline import DeadlineExceeded
from tsexplain.serving.answers import ranked_rows
from tsexplain.serving.flow import ExplainFlow, Metrics, Row
from tsexplain.serving.policy import ExplanationGate
from tsexplain.serving.runners.base import Runner
from tsexplain.serving.settings import load_settings

LABELS = ["a", "b", "c"]
EXPLAIN = {"explain": True, "plain": True}


class FakeRunner(Runner):
    modality = "text"
    labels = LABELS
    fused_methods = frozenset({"grad_x_input"})
    explanation_fields = ("n_steps", "top_k", "html")

    def __init__(self):
        self.tie = 0  # the class predicted for texts that name none
        self.forwards, self.explained = [], []
        self.fail = None  # an exception explain() raises
        self.bad = set()  # texts explain() rejects as input errors

    def prepare(self, item):
        item.inputs = item.request.data

    def cache_input(self, item):
        return item.inputs.encode()

    def prediction_top_k(self, item):
        return len(LABELS)

    def predicted(self, text):
        return LABELS.index(text[0]) if text[0] in LABELS and text[1:2] == " " else self.tie

    def forward(self, items, fused):
        self.forwards.append(([i.inputs for i in items], [i.inputs for i in fused]))
        for item in fused:
            item.explained_class = self.predicted(item.inputs) if item.target is None else item.target
            item.result = {"fused": True, "class": item.explained_class}
        probabilities = torch.full((len(items), len(LABELS)), 0.1)
        for k, item in enumerate(items):
            probabilities[k, self.predicted(item.inputs)] = 0.8
        return probabilities

    def group_key(self, item):
        return item.method, item.options["n_steps"]

    def explain(self, items):
        if self.fail is not None:
            raise self.fail
        if any(i.inputs in self.bad for i in items):
            raise EmptyText("a text it cannot explain")
        self.explained.append([i.inputs for i in items])
        return [{"fused": False, "class": i.explained_class} for i in items]

    def render(self, item):
        return {"method": item.method, "target": {"index": item.explained_class}, **item.result,
                "n_steps": item.options["n_steps"]}


class Counting(Metrics):
    def __init__(self):
        self.counts = {}

    def count(self, name, value=1, method=None, **dimensions):
        self.counts[name] = self.counts.get(name, 0) + value
        for label in dimensions.values():
            self.counts[(name, label)] = self.counts.get((name, label), 0) + value


def flow_with(explain=None, cache_mb=0, secret=None):
    settings = load_settings("text", {"explain": {"cache_mb": cache_mb, **(explain or {})}}, "m", {})
    s = settings.explain
    gate = ExplanationGate(s.enabled, s.policy, s.priority_header, s.priority_values, s.on_denied, s.max_per_batch,
                           secret, s.routes)
    runner = FakeRunner()
    flow = ExplainFlow(runner, settings, gate, ExplanationCache(int(cache_mb * 2**20), 100), metrics=Counting(),
                       model_name="m", model_version="1.0", cache_version="1.0+abc")
    return flow, runner


def rows(*requests):
    """Rows from (body, route) pairs: route EXPLAIN, a prediction ({}), or KServe ({"plain": False, ...})."""
    out = []
    for body, route in requests:
        body = json.dumps(body).encode() if isinstance(body, dict) else body.encode()
        out.append(Row({"body": body}, route.get("headers", {}), explain=route.get("explain", False),
                       plain=route.get("plain", True), request_id="r"))
    return out


def answers(flow, batch, **kwargs):
    flow.run(batch, **kwargs)
    return [(row.answer.status, json.loads(row.answer.body)) for row in batch]


def test_each_request_is_answered_as_if_alone():
    flow, runner = flow_with()
    out = answers(flow, rows(("b one", {}), ('{"data": ', EXPLAIN), ({"data": "c two", "n_steps": 9}, EXPLAIN),
                             ({"data": "a three", "method": "occlusion", "n_steps": 4}, EXPLAIN),
                             ({"data": "c four", "target": "nope"}, EXPLAIN), ({"data": "a five", "colour": 1}, {})))
    assert out[0][0] == 200 and out[0][1] == pytest.approx({"b": 0.8, "a": 0.1, "c": 0.1})  # the stock body
    assert list(out[0][1])[0] == "b"  # most probable first
    assert [(status, body.get("type")) for status, body in out[1:]] == [
        (400, "bad_json"), (200, None), (400, "bad_n_steps"), (400, "unknown_target"), (400, "unknown_field")]
    assert out[2][1]["explanation"] == {"method": "layer_ig", "target": {"index": 2}, "fused": False, "class": 2,
                                        "n_steps": 9, "cached": False, "elapsed_ms": out[2][1]["explanation"]["elapsed_ms"]}
    assert runner.forwards == [(["b one", "c two"], [])] and runner.explained == [["c two"]]


def test_fused_methods_come_out_of_the_prediction_forward_and_the_rest_run_in_groups():
    flow, runner = flow_with()
    out = answers(flow, rows(({"data": "a x", "method": "grad_x_input"}, EXPLAIN), ({"data": "b y", "n_steps": 8}, EXPLAIN),
                             ({"data": "c z", "n_steps": 8}, EXPLAIN), ({"data": "a w", "n_steps": 16}, EXPLAIN),
                             ("b v", {})))
    assert runner.forwards == [(["a x", "b y", "c z", "a w", "b v"], ["a x"])]  # one forward, fused included
    assert sorted(runner.explained) == [["a w"], ["b y", "c z"]]  # one call per method and step count
    assert out[0][1]["explanation"]["fused"] is True and out[0][1]["explanation"]["n_steps"] is None
    assert [body["explanation"]["target"]["index"] for _, body in out[:4]] == [0, 1, 2, 0]


def test_the_ready_rows_are_handed_over_before_the_explanation_work():
    flow, runner = flow_with()
    seen = []

    def on_ready(ready):
        seen.append(([row.answer.status for row in ready], list(runner.explained)))

    batch = rows(("a p", {}), ({"data": "b q"}, EXPLAIN), ({"data": "c r", "method": "grad_x_input"}, EXPLAIN),
                 ('{"data": ', {}))
    flow.run(batch, on_ready=on_ready)
    assert seen == [([200, 200, 400], [])]  # the prediction, the fused map and the error, before any explanation
    assert [row.answer.status for row in batch] == [200, 200, 200, 400]
    flow.run(rows(("a p", {}), ({"data": "c r", "method": "grad_x_input"}, EXPLAIN)), on_ready=on_ready)
    assert len(seen) == 1  # nothing left to explain: no hand-over


def test_concurrent_flow_fuses_nothing():
    flow, runner = flow_with()
    flow.concurrent = True
    answers(flow, rows(({"data": "a x", "method": "grad_x_input"}, EXPLAIN),))
    assert runner.forwards == [(["a x"], [])] and runner.explained == [["a x"]]


def test_the_gate_decides_per_request():
    flow, _ = flow_with({"policy": "priority", "on_denied": "predict", "max_per_batch": 1})
    out = answers(flow, rows(({"data": "a x"}, EXPLAIN), ({"data": "a x", "priority": "high"}, EXPLAIN),
                             ({"data": "b y", "priority": "audit"}, EXPLAIN)))
    assert out[0][1]["explanation"] is None and "priority" in out[0][1]["explanation_skipped"]
    assert out[1][1]["explanation"]["target"]["index"] == 0
    assert out[2][1]["explanation"] is None and "too many" in out[2][1]["explanation_skipped"]
    flow, _ = flow_with({"max_per_batch": 1})  # on_denied: reject
    out = answers(flow, rows(({"data": "a x"}, EXPLAIN), ({"data": "b y"}, EXPLAIN)))
    assert [status for status, _ in out] == [200, 429] and out[1][1]["type"] == "too_many_explanations"
    flow, _ = flow_with(secret=b"s3cret")
    out = answers(flow, rows(({"data": "a x"}, EXPLAIN), ({"data": "a x"}, {**EXPLAIN, "headers": {"x-explain-token": "s3cret"}})))
    assert [status for status, _ in out] == [403, 200] and out[0][1]["type"] == "explanation_denied"
    assert flow.metrics.counts["ExplanationsDenied"] == flow.metrics.counts[("ExplanationsDenied", "token")] == 1


def test_override_rights_method_rights_and_deadline_bound():
    flow, _ = flow_with({"request_overrides": ["target"], "methods": ["layer_ig", "occlusion"], "deadline_ms": 1000})
    out = answers(flow, rows(({"data": "a x", "n_steps": 8}, EXPLAIN), ({"data": "a x", "method": "grad_x_input"}, EXPLAIN),
                             ({"data": "a x", "method": "saliency"}, EXPLAIN), ({"data": "a x", "target": 1}, EXPLAIN)))
    assert [(status, body.get("type")) for status, body in out] == [
        (400, "override_not_allowed"), (400, "override_not_allowed"), (400, "unknown_method"), (200, None)]
    flow, _ = flow_with({"methods": ["layer_ig", "occlusion"], "deadline_ms": 1000})
    out = answers(flow, rows(({"data": "a x", "method": "grad_x_input"}, EXPLAIN), ({"data": "a x", "deadline_ms": 2000}, EXPLAIN),
                             ({"data": "a x", "target": 1, "contrast": "b"}, EXPLAIN), ({"data": "a x", "contrast": "a"}, EXPLAIN)))
    assert [(status, body.get("type")) for status, body in out] == [
        (403, "method_not_allowed"), (400, "bad_deadline_ms"), (400, "bad_contrast"), (400, "bad_contrast")]


def test_cache_hits_skip_the_work_and_stale_hits_are_explained_again():
    flow, runner = flow_with(cache_mb=1)
    first = answers(flow, rows(({"data": "tie"}, EXPLAIN),))[0][1]
    again = answers(flow, rows(({"data": "tie"}, EXPLAIN),))[0][1]
    assert first["explanation"]["cached"] is False and again["explanation"]["cached"] is True
    assert runner.explained == [["tie"]] and flow.metrics.counts == {"ExplanationCacheMisses": 1, "ExplanationCacheHits": 1,
                                                                     "ExplanationsServed": 2}
    runner.tie = 2  # the near-tie goes the other way: the stored map explains another class
    fresh = answers(flow, rows(({"data": "tie"}, EXPLAIN),))[0][1]
    assert fresh["explanation"]["cached"] is False and fresh["explanation"]["target"]["index"] == 2
    assert fresh["predictions"][0]["index"] == 2 and runner.explained == [["tie"], ["tie"]]
    named = answers(flow, rows(({"data": "tie", "target": 0}, EXPLAIN),))[0][1]  # a named class is another key
    assert named["explanation"]["cached"] is False and named["explanation"]["target"]["index"] == 0


def test_failures_fail_their_group_alone_and_input_errors_their_request_alone():
    flow, runner = flow_with()
    runner.bad = {"a bad"}
    out = answers(flow, rows(({"data": "a good"}, EXPLAIN), ({"data": "a bad"}, EXPLAIN), ("b pred", {})))
    assert [(status, body.get("type")) for status, body in out] == [(200, None), (400, "empty_text"), (200, None)]
    runner.bad, runner.fail = set(), RuntimeError("CUDA out of memory")
    out = answers(flow, rows(({"data": "a x"}, EXPLAIN), ({"data": "a y", "n_steps": 8}, EXPLAIN), ("b z", {})))
    assert [(status, body.get("type")) for status, body in out] == [(507, "out_of_memory"), (507, "out_of_memory"),
                                                                     (200, None)]
    runner.fail = KeyError("boom")
    out = answers(flow, rows(({"data": "a x"}, EXPLAIN),))
    assert out[0][0] == 503 and out[0][1]["type"] == "explanation_failed" and "boom" not in out[0][1]["message"]
    assert flow.metrics.counts["ExplanationsFailed"] == 3


def test_injected_faults_fail_the_fused_maps_alone():
    flow, runner = flow_with({"inject_fault": "error"})
    out = answers(flow, rows(({"data": "a x", "method": "grad_x_input"}, EXPLAIN), ("b y", {})))
    assert out[0][0] == 503 and out[1][0] == 200
    assert runner.forwards == [(["a x", "b y"], [])]  # the predictions ran without the failed maps


def test_a_request_past_its_deadline_gets_504_and_the_others_are_explained():
    flow, runner = flow_with()
    calls = []

    def slow_explain(items):
        calls.append([i.inputs for i in items])
        if "a late" in calls[-1]:  # stands in for a module call past the earliest deadline
            raise DeadlineExceeded(1, 5)
        return [{"fused": False, "class": i.explained_class} for i in items]

    runner.explain = slow_explain
    out = answers(flow, rows(({"data": "a late", "deadline_ms": 1}, EXPLAIN),
                             ({"data": "a fine", "deadline_ms": 20000}, EXPLAIN)))
    assert out[0][0] == 504 and out[0][1]["type"] == "deadline_exceeded" and "1 ms" in out[0][1]["message"]
    assert out[1][0] == 200 and calls[-1] == ["a fine"] and flow.metrics.counts["ExplanationsTimedOut"] == 1


def test_kserve_instances_are_answered_as_if_alone():
    flow, _ = flow_with({"max_instances": 3})
    v1 = {"instances": ["a x", {"data": "b y", "target": "c"}, {"data": ""}], "parameters": {"top_k": 2}}
    v2 = {"id": "q", "inputs": [{"name": "in", "shape": [1], "datatype": "BYTES", "data": ["c z"]}]}
    out = answers(flow, rows((v1, {"explain": True, "plain": False}), (v2, {"plain": False}),
                             ({"instances": ["a"] * 4}, {"explain": True, "plain": False}),
                             (v1, EXPLAIN)))  # on /explanations a KServe-looking body is a plain request
    status, body = out[0]
    assert status == 200 and [e.get("type") or e["explanation"]["target"]["index"] for e in body["explanations"]] == [
        0, 2, "empty_text"]
    assert out[1][0] == 200 and out[1][1]["id"] == "q" and out[1][1]["model_version"] == "1.0"
    assert json.loads(out[1][1]["outputs"][0]["data"][0]) == pytest.approx({"c": 0.8, "a": 0.1, "b": 0.1})
    assert out[2][0] == 413 and out[2][1]["type"] == "too_many_instances"
    assert out[3][0] == 400 and out[3][1]["type"] == "unknown_field"


def test_the_flow_never_raises():
    flow, runner = flow_with()
    runner.forward = lambda items, fused: (_ for _ in ()).throw(RuntimeError("the model broke"))
    out = answers(flow, rows(("a x", {}), ({"data": "b y"}, EXPLAIN), ('{"data": ', {})))
    assert [(status, body["type"]) for status, body in out] == [(503, "server_error"), (503, "server_error"),
                                                               (400, "bad_json")]


def test_ranked_rows_are_the_row_by_row_rankings_ties_included():
    """The flow ranks a batch with one topk per distinct top_k: the same (index, label,
    probability) lists, in the same order, as a topk of each row alone."""
    generator = torch.Generator().manual_seed(0)
    for classes in (2, 6, 1000):
        labels = [f"c{i}" for i in range(classes)]
        batches = [torch.softmax(torch.randn(7, classes, generator=generator), 1),
                   torch.softmax(torch.randn(7, classes, generator=generator) * 100, 1),  # exact zeros tie
                   torch.full((7, classes), 1 / classes),  # every class ties
                   torch.randint(0, 3, (7, classes), generator=generator).float() / 3]
        for probabilities in batches:
            for top_ks in ([5] * 7, [1, 5, 2, 1000, 5, 3, 1]):
                expected = []
                for row, top_k in zip(probabilities, top_ks):
                    values, indices = row.topk(min(top_k, classes))
                    expected.append([(i, labels[i], p) for i, p in zip(indices.tolist(), values.tolist())])
                assert ranked_rows(probabilities, labels, top_ks) == expected
