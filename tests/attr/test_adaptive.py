"""The adaptive step schedule (tsexplain.attr.text.adaptive): doubling, the maximum, and deadlines,
on a fake integral with a fake clock (no model), then through Layer IG on a tiny model."""

import pytest
import torch

from tiny_hf import tiny_classifier
from tsexplain.attr.text.adaptive import AdaptiveSteps, TimeLimits, run_schedule
from tsexplain.attr.text.lig import LayerIGTextExplainer


class Interrupted(Exception):
    """What a caller's guard raises in the middle of a round (the flow's DeadlineExceeded)."""


class FakeIntegral:
    """Text i converges (relative delta 0.01) from ``needs[i]`` steps on; each round costs
    ``cost`` seconds per (text, step) on a fake clock; ``interrupt_at``: a round of that many
    steps raises :class:`Interrupted`."""

    def __init__(self, needs, cost=0.001, interrupt_at=None):
        self.needs, self.cost, self.interrupt_at = needs, cost, interrupt_at
        self.now, self.calls = 0.0, []

    def clock(self):
        return self.now

    def __call__(self, indices, steps):
        self.calls.append((list(indices), steps))
        if steps == self.interrupt_at:
            self.now += self.cost * len(indices) * steps / 2
            raise Interrupted
        self.now += self.cost * len(indices) * steps
        relative = [0.01 if steps >= self.needs[i] else 1.0 for i in indices]
        return [f"value {i} at {steps}" for i in indices], [r / 10 for r in relative], relative

    def deadline(self, seconds):
        """A deadline ``seconds`` after the fake start."""
        return lambda: seconds - self.now


SCHEDULE = AdaptiveSteps(start=8, max=128, max_relative_delta=0.05)


def test_doubles_only_the_unconverged_and_stops_at_the_bound():
    integral = FakeIntegral([8, 32, 16])
    out = run_schedule(integral, 3, SCHEDULE)
    assert integral.calls == [([0, 1, 2], 8), ([1, 2], 16), ([1], 32)]
    assert out.n_steps == [8, 32, 16] and out.converged == [True] * 3 and out.stopped == ["bound"] * 3
    assert out.values == ["value 0 at 8", "value 1 at 32", "value 2 at 16"]


def test_stops_at_max_flagged_unconverged():
    integral = FakeIntegral([8, 10_000])
    out = run_schedule(integral, 2, SCHEDULE)
    assert integral.calls[-1] == ([1], 128)
    assert out.n_steps == [8, 128] and out.converged == [True, False] and out.stopped == ["bound", "max_n_steps"]
    assert out.relative[1] == 1.0  # its last round's delta, reported as it is


def test_a_text_whose_next_round_would_end_late_keeps_its_last_result():
    # rounds cost 1 ms per (text, step): 8 steps x 2 texts = 16 ms, then 16 x 2 = 32 ms (48 ms in all),
    # then 32 x 2 = 64 ms. Text 0 is due at 60 ms: it cannot take the 32-step round (48 + 64 ms), and
    # alone that round would cost 32 ms (ends at 80 ms) for text 1, which has a second.
    integral = FakeIntegral([10_000, 64])
    limits = TimeLimits([integral.deadline(0.060), integral.deadline(1.0)], (Interrupted,), clock=integral.clock)
    out = run_schedule(integral, 2, SCHEDULE, limits)
    assert integral.calls == [([0, 1], 8), ([0, 1], 16), ([1], 32), ([1], 64)]
    assert out.n_steps == [16, 64] and out.converged == [False, True] and out.stopped == ["deadline", "bound"]
    assert out.values[0] == "value 0 at 16"


def test_no_limit_and_a_far_deadline_change_nothing():
    plain = run_schedule(FakeIntegral([8, 10_000]), 2, SCHEDULE)
    integral = FakeIntegral([8, 10_000])
    far = run_schedule(integral, 2, SCHEDULE, TimeLimits([None, integral.deadline(1e6)], clock=integral.clock))
    assert (far.n_steps, far.converged, far.stopped) == (plain.n_steps, plain.converged, plain.stopped)


def test_a_round_interrupted_after_the_first_answers_the_last_results():
    integral = FakeIntegral([10_000, 10_000], interrupt_at=32)
    limits = TimeLimits([None, None], (Interrupted,), clock=integral.clock)
    out = run_schedule(integral, 2, SCHEDULE, limits)
    assert out.n_steps == [16, 16] and out.converged == [False, False] and out.stopped == ["deadline"] * 2


def test_an_interrupted_first_round_lets_the_interruption_through():
    integral = FakeIntegral([8], interrupt_at=8)
    with pytest.raises(Interrupted):
        run_schedule(integral, 1, SCHEDULE, TimeLimits([None], (Interrupted,), clock=integral.clock))
    with pytest.raises(Interrupted):  # not named by the caller: never caught
        run_schedule(FakeIntegral([8, 8], interrupt_at=16), 2, AdaptiveSteps(16, 16, 0.05))
    with pytest.raises(Interrupted):
        run_schedule(FakeIntegral([10_000], interrupt_at=16), 1, SCHEDULE, TimeLimits([None], clock=integral.clock))


def test_layer_ig_with_no_time_left_after_the_first_round_answers_it_unconverged():
    model, tok = tiny_classifier("distilbert")  # its texts need more than 2 steps
    texts, targets = ["the movie was unbelievably good , i loved it", "bad film"], [0, 2]
    explainer = LayerIGTextExplainer(model, tok, adaptive=AdaptiveSteps(2, 256, 1e-9))
    calls = []
    limits = TimeLimits([lambda: 0.0 if calls else 1e6, None])  # text 0 runs out of time after its first round
    original = explainer._integrate
    explainer._integrate = lambda *args: calls.append(args[2:]) or original(*args)
    result = explainer.explain(texts, targets, limits=limits)
    assert calls[0][1] == 2 and all(0 not in indices for indices, _ in calls[1:])
    assert result[0].n_steps == 2 and result[0].converged is False
    assert result[1].n_steps == 256 and result[1].converged is False
    direct = LayerIGTextExplainer(model, tok, n_steps=2).explain(texts[:1], targets[:1])[0]
    assert torch.allclose(torch.tensor([t.attribution for t in direct.tokens]),
                          torch.tensor([t.attribution for t in result[0].tokens]), atol=1e-6)
    with pytest.raises(ValueError, match="one time limit"):
        explainer.explain(texts, targets, limits=TimeLimits([None]))
