"""The adaptive step schedule of Layer IG: double the steps of the texts that have not
converged, within a maximum and within each text's time.

Plain Python around an ``integrate(indices, n_steps)`` callable, so that the schedule
is testable without a model. The rule near a deadline (see docs/design.md, "Adaptive
steps near a deadline"): a text whose next round would end after its deadline is not
recomputed, and keeps the result of its last round, flagged unconverged; a round that
the caller's guard interrupts anyway ends the schedule the same way. Only a first
round, before any result exists, lets the interruption through.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from ..names import MAX_TEXT_N_STEPS

@dataclass(frozen=True)
class AdaptiveSteps:
    """Adaptive number of integration steps (``n_steps="auto"``, the default).

    Every text starts at ``start`` steps; the texts whose relative convergence
    delta exceeds ``max_relative_delta`` are recomputed with twice the steps, up to
    ``max``. Texts that converged are not recomputed, so a text's answer equals a
    direct call at its final ``n_steps``. Defaults measured in
    ``benchmarks/lig_convergence.py`` (README "Convergence by family").
    """

    start: int = 8
    max: int = 256
    max_relative_delta: float = 0.05

    def __post_init__(self):
        if not (is_steps(self.start) and is_steps(self.max) and self.start <= self.max):
            raise ValueError(f"adaptive steps need integers 1 <= start <= max <= {MAX_TEXT_N_STEPS}, "
                             f"got {self.start}, {self.max}")
        bound = self.max_relative_delta
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0 < bound < math.inf:
            raise ValueError(f"max_relative_delta must be a positive number, got {bound!r}")


@dataclass(frozen=True)
class TimeLimits:
    """When each text's explanation is due, for the adaptive schedule.

    Args:
        seconds_left: one per text: a callable giving the seconds left (negative once
            past), or None for no limit.
        interrupted_by: exception types the caller's guard raises when a deadline
            passes in the middle of a round (the serving flow's ``DeadlineExceeded``):
            after the first round they end the schedule with the results reached.
        clock: seconds, to time the rounds.
    """

    seconds_left: Sequence[Optional[Callable[[], float]]]
    interrupted_by: tuple = ()
    clock: Callable[[], float] = field(default=time.perf_counter, compare=False)

    def in_time(self, pending: list[int], n_steps: int, seconds_per_row: float) -> list[int]:
        """The texts of ``pending`` that can take a round of ``n_steps`` together and
        still be done in time: a round costs ``seconds_per_row`` per (text, step), so the
        texts with the least time left are left out until the round fits everyone kept."""
        left = {i: (math.inf if self.seconds_left[i] is None else self.seconds_left[i]()) for i in pending}
        kept = sorted(pending, key=lambda i: left[i])
        while kept and left[kept[0]] < seconds_per_row * n_steps * len(kept):
            kept.pop(0)
        return [i for i in pending if i in set(kept)]


@dataclass
class Outcome:
    """Per text: attributions, absolute and relative delta, steps, converged, and why its
    schedule stopped (``"bound"``: converged, ``"max_n_steps"``, ``"deadline"``)."""

    values: list
    absolute: list
    relative: list
    n_steps: list
    converged: list
    stopped: list


def run_schedule(integrate: Callable, n_texts: int, schedule: AdaptiveSteps,
                 limits: Optional[TimeLimits] = None) -> Outcome:
    """Run ``schedule`` over ``n_texts`` texts.

    ``integrate(indices, n_steps)`` returns ``(values, absolute, relative)``, one entry
    per index. A text stops at the bound (converged), at ``schedule.max`` or when
    ``limits`` leave no time for its next round (both unconverged, with the last
    round's result).
    """
    out = Outcome([None] * n_texts, [math.nan] * n_texts, [math.nan] * n_texts, [0] * n_texts,
                  [False] * n_texts, ["max_n_steps"] * n_texts)
    interrupted = limits.interrupted_by if limits is not None else ()
    clock = limits.clock if limits is not None else time.perf_counter
    pending, steps, seconds_per_row = list(range(n_texts)), schedule.start, None
    while pending:
        if limits is not None and seconds_per_row is not None:
            kept = limits.in_time(pending, steps, seconds_per_row)
            for i in set(pending) - set(kept):
                out.stopped[i] = "deadline"
            pending = kept
            if not pending:
                break
        began = clock()
        try:
            values, absolute, relative = integrate(pending, steps)
        except interrupted:
            if seconds_per_row is None:  # no result to answer with yet
                raise
            for i in pending:
                out.stopped[i] = "deadline"
            break
        seconds_per_row = max(clock() - began, 0.0) / (len(pending) * steps)
        still = []
        for k, i in enumerate(pending):
            out.values[i], out.absolute[i], out.relative[i], out.n_steps[i] = values[k], absolute[k], relative[k], steps
            out.converged[i] = bool(relative[k] <= schedule.max_relative_delta)
            if out.converged[i]:
                out.stopped[i] = "bound"
            else:
                still.append(i)
        if steps >= schedule.max:
            break
        pending, steps = still, min(2 * steps, schedule.max)
    return out


def is_steps(n_steps) -> bool:
    return isinstance(n_steps, int) and not isinstance(n_steps, bool) and 1 <= n_steps <= MAX_TEXT_N_STEPS
