"""Per-request deadlines through both handlers in process: a request past its deadline
gets a 504 alone. Work is made to outlast a small deadline by a module that sleeps
(nothing here asserts a duration)."""
import time

import numpy as np
import pytest
import torch
from torch.nn.modules import module as torch_module

from harness import EXPLAIN, InProcessHandler, build_image_mar, build_text_mar, png, unpack


def no_hooks_left():
    """No global module hooks left behind (the deadline guard installs one while it works)."""
    return not torch_module._global_forward_pre_hooks and not torch_module._global_forward_hooks


def sleeping(module, seconds):
    """Make every forward of ``module`` take at least ``seconds``."""
    return module.register_forward_pre_hook(lambda *_: time.sleep(seconds))


def timed_out_count(handler):
    return sum(args[1] for name, args, _ in handler.metrics.calls if name == "add_counter" and args[0] == "ExplanationsTimedOut")


@pytest.fixture(scope="module")
def text_handler(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deadline_text")
    config = {"explain": {"n_steps": 64, "max_n_steps": 64, "internal_batch_size": 4, "deadline_ms": 60_000,
                          "cache_mb": 0}}  # every request does its work
    mar = build_text_mar(tmp, "tiny", config=config)
    return InProcessHandler(unpack(mar, tmp / "unpacked"), "text_explainer", "TextExplainer")


def test_text_request_past_its_deadline_gets_504_alone(text_handler):
    model = text_handler.handler.model
    alone = text_handler([({"data": "the soup was cold", "target": 0}, EXPLAIN)])[0]
    before = timed_out_count(text_handler)
    slow = sleeping(model.get_input_embeddings(), 0.01)  # 16 forwards per explanation: > 160 ms
    try:
        out = text_handler([
            ({"data": "the soup was cold", "target": 0, "deadline_ms": 50}, EXPLAIN),  # same group as the next
            ({"data": "the soup was cold", "target": 0}, EXPLAIN),
            ("a prediction in the same batch".encode(), {}),
            ({"data": "another group", "n_steps": 8, "deadline_ms": 1}, EXPLAIN),
        ])
    finally:
        slow.remove()
    assert [status for status, _ in out] == [504, 200, 200, 504]
    for _, body in (out[0], out[3]):
        assert body["type"] == "deadline_exceeded" and body["code"] == 504 and "ms" in body["message"]
    assert "50 ms" in out[0][1]["message"]
    # The request still in time was explained as if alone, after its neighbour was stopped.
    np.testing.assert_allclose([t["attribution"] for t in out[1][1]["explanation"]["tokens"]],
                               [t["attribution"] for t in alone[1]["explanation"]["tokens"]], rtol=1e-4, atol=1e-6)
    assert set(out[2][1]) == {"negative", "neutral", "positive"}
    assert timed_out_count(text_handler) - before == 2
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules()) and no_hooks_left()
    assert all(p.grad is None for p in model.parameters()) and torch.is_grad_enabled()
    # The model still answers, and the same request without a tight deadline is explained.
    again = text_handler([({"data": "the soup was cold", "target": 0}, EXPLAIN)])[0]
    assert again[0] == 200


def test_request_deadline_may_only_lower_the_configured_one(text_handler):
    out = text_handler([({"data": "fine", "deadline_ms": 60_001}, EXPLAIN), ({"data": "fine", "deadline_ms": 0}, EXPLAIN),
                        ({"data": "fine", "deadline_ms": 60_000}, EXPLAIN)])
    assert [status for status, _ in out] == [400, 400, 200]
    assert out[0][1]["type"] == out[1][1]["type"] == "bad_deadline_ms"
    assert "60000" in out[0][1]["message"]


def test_image_request_past_its_deadline_gets_504_alone(tmp_path):
    mar = build_image_mar(tmp_path, "pets", config={"handler": {"resize": 64, "crop": 64},
                                                     "explain": {"target_layer": "layer2", "cache_mb": 0}})
    handler = InProcessHandler(unpack(mar, tmp_path / "unpacked"), "image_explainer", "ImageExplainer")
    model = handler.handler.model
    rng = np.random.default_rng(0)
    from PIL import Image

    data = png(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    alone = handler([(data, EXPLAIN), (data, {})])
    slow = sleeping(model.layer1, 0.05)
    try:
        import base64

        tight = {"data": base64.b64encode(data).decode(), "deadline_ms": 20}
        out = handler([(tight, EXPLAIN), (data, EXPLAIN), (data, {})])
    finally:
        slow.remove()
    assert [status for status, _ in out] == [504, 200, 200]
    assert out[0][1]["type"] == "deadline_exceeded" and "20 ms" in out[0][1]["message"]
    np.testing.assert_allclose(out[1][1]["explanation"]["heatmap"]["values"],
                               alone[0][1]["explanation"]["heatmap"]["values"], atol=2e-3)
    np.testing.assert_allclose(list(out[2][1].values()), list(alone[1][1].values()), atol=1e-5)
    assert timed_out_count(handler) == 1
    assert all(not m._forward_pre_hooks and not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert no_hooks_left()
    assert all(p.grad is None for p in model.parameters()) and torch.is_grad_enabled()


def test_adaptive_steps_near_the_deadline_answer_the_last_round_unconverged(tmp_path):
    """docs/design.md, "Adaptive steps near a deadline": the doubling stops where the deadline leaves
    no time for the next round, and the answer is the last round's result, flagged unconverged (a 200,
    not a 504). The bound is unreachable and every forward sleeps 50 ms, so the rounds take at least
    0.35, 0.45, 0.65, 1.05, 1.85, 3.45, 6.65, 13 s (8 ... 1024 steps, 4 steps per pass; 8 to 512 in all
    take 14.5 s): a 10 s deadline always cuts the doubling, and leaves the first round (2.3 s measured on
    a 2-core machine at load average 10) time enough after a warm-up."""
    config = {"explain": {"n_steps": "auto", "adaptive_max": 1024, "max_n_steps": 1024, "max_relative_delta": 1e-12,
                          "internal_batch_size": 4, "deadline_ms": 60_000, "cache_mb": 0}}
    mar = build_text_mar(tmp_path, "tiny", config=config)
    handler = InProcessHandler(unpack(mar, tmp_path / "unpacked"), "text_explainer", "TextExplainer")
    model = handler.handler.model
    assert handler([({"data": "warm up", "n_steps": 8}, EXPLAIN)])[0][0] == 200  # first-call costs, untimed
    slow = sleeping(model.get_input_embeddings(), 0.05)
    try:
        [(status, body)] = handler([({"data": "the soup was cold", "target": 0, "deadline_ms": 10_000}, EXPLAIN)])
    finally:
        slow.remove()
    assert status == 200, body
    e = body["explanation"]
    assert e["converged"] is False and 8 <= e["n_steps"] < 1024
    assert timed_out_count(handler) == 0
    # the answer is that round's result: the same as a direct call at its n_steps
    direct = handler.handler.runner.explainers["layer_ig"].explain(["the soup was cold"], [0], n_steps=e["n_steps"])[0]
    np.testing.assert_allclose([t["attribution"] for t in e["tokens"]], [t.attribution for t in direct.tokens],
                               rtol=1e-4, atol=1e-6)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules()) and no_hooks_left()
