"""Per-request deadlines: the guard and the settings (through the handlers: tests/glue/test_deadline_handler.py).

Time is made to pass deterministically: the core tests use a fake clock that a
module advances on each forward; the handler tests make one module sleep, so
work is known to outlast a small deadline (nothing here asserts a duration).
"""
import threading

import pytest
import torch
from captum.attr import LayerIntegratedGradients
from torch import nn
from torch.nn.modules import module as torch_module

from tsexplain.serving.deadline import Deadline, DeadlineExceeded, enforce
from tsexplain.serving.errors import ConfigError
from tsexplain.serving.settings import ImageExplainSettings, TextExplainSettings, load_section


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
