"""Per-request deadlines: the core guard, settings, and both handlers in process.

Time is made to pass deterministically: the core tests use a fake clock that a
module advances on each forward; the handler tests make one module sleep, so
work is known to outlast a small deadline (nothing here asserts a duration).
"""
import threading
import time

import numpy as np
import pytest
import torch
from captum.attr import LayerIntegratedGradients
from torch import nn
from torch.nn.modules import module as torch_module

from harness import EXPLAIN, InProcessHandler, build_image_mar, build_text_mar, png, unpack
from tsexplain.deadline import Deadline, DeadlineExceeded, enforce
from tsexplain.errors import ConfigError
from tsexplain.settings import ImageExplainSettings, TextExplainSettings, load_section


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Ticking(nn.Module):
    """A small MLP whose first layer advances the clock one second per forward."""

    def __init__(self, clock):
        super().__init__()
        self.clock = clock
        self.forwards = 0
        self.embed = nn.Linear(4, 8)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(8, 3))
        self.embed.register_forward_hook(self._tick)

    def _tick(self, *_):
        self.forwards += 1
        self.clock.now += 1.0

    def forward(self, x):
        return self.head(self.embed(x))


def no_hooks_left(model=None):
    """No global hooks, and none on the model but the test's own clock tick."""
    if torch_module._global_forward_pre_hooks or torch_module._global_forward_hooks:
        return False
    if model is None:
        return True
    return all(not m._forward_pre_hooks and not m._backward_hooks for m in model.modules()) and all(
        list(m._forward_hooks.values()) in ([], [model._tick]) if m is model.embed else not m._forward_hooks
        for m in model.modules())


def test_deadline_expiry_and_check():
    clock = FakeClock()
    deadline = Deadline(1500, clock=clock)
    assert not deadline.expired() and deadline.remaining_ms() == pytest.approx(1500)
    clock.now += 1.5
    assert not deadline.expired()  # exactly at the end is still in time
    clock.now += 0.01
    assert deadline.expired() and deadline.remaining_ms() < 0
    with pytest.raises(DeadlineExceeded, match="1500 ms") as info:
        deadline.check()
    assert info.value.limit_ms == 1500 and info.value.elapsed_ms == pytest.approx(1510)
    with pytest.raises(ValueError):
        Deadline(0)


def test_enforce_stops_layer_ig_at_the_first_forward_past_the_deadline():
    clock = FakeClock()
    model = Ticking(clock).eval()
    x = torch.randn(2, 4)
    lig = LayerIntegratedGradients(model, model.embed)
    lig.attribute(x, torch.zeros_like(x), target=0, n_steps=20, internal_batch_size=4)
    unbounded = model.forwards
    assert unbounded >= 10 and no_hooks_left(model)

    model.forwards = 0
    with pytest.raises(DeadlineExceeded):
        with enforce(Deadline(3000, clock=clock)):  # three forwards' worth of fake seconds
            lig.attribute(x, torch.zeros_like(x), target=0, n_steps=20, internal_batch_size=4)
    assert model.forwards == 4  # the fourth forward passed the deadline and was stopped inside
    assert no_hooks_left(model)  # ours and captum's, also after the raise
    assert all(p.grad is None for p in model.parameters()) and torch.is_grad_enabled()


def test_enforce_checks_on_entry_installs_only_while_inside_and_none_is_free():
    clock = FakeClock()
    model = Ticking(clock)
    deadline = Deadline(1500, clock=clock)
    with enforce(deadline):
        assert len(torch_module._global_forward_pre_hooks) == 1
        model(torch.zeros(1, 4))
    assert no_hooks_left(model)
    clock.now += 1  # 2 s since the start: past
    with pytest.raises(DeadlineExceeded):
        with enforce(deadline):
            pytest.fail("work past its deadline must not start")
    with enforce(None):
        assert no_hooks_left(model)
        model(torch.zeros(1, 4))


def test_enforce_stops_only_the_thread_that_installed_it():
    clock = FakeClock()
    model = Ticking(clock)
    other_thread = []
    with pytest.raises(DeadlineExceeded):
        with enforce(Deadline(500, clock=clock)):
            worker = threading.Thread(target=lambda: other_thread.append([model(torch.zeros(1, 4)) for _ in range(3)]))
            worker.start()
            worker.join()
            model(torch.zeros(1, 4))  # clock at +4 s: this thread is stopped
    assert len(other_thread) == 1 and len(other_thread[0]) == 3  # past the deadline, not stopped
    assert no_hooks_left(model)


@pytest.mark.parametrize("cls", [ImageExplainSettings, TextExplainSettings])
def test_deadline_setting(cls):
    assert cls().deadline_ms == 30_000
    assert load_section(cls, {"deadline_ms": None}, "m", {}).deadline_ms is None
    assert load_section(cls, {}, "my-model", {"TSEXPLAIN_MY_MODEL_DEADLINE_MS": "250"}).deadline_ms == 250
    for bad in (0, -5, 2.5, "1s", True, 3_600_001):
        with pytest.raises(ConfigError, match="deadline_ms"):
            load_section(cls, {"deadline_ms": bad}, "m", {})
    assert "deadline_ms" in cls.override_fields


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
