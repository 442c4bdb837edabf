"""Predictions that do not wait for explanations: one worker, one set of weights, two lanes.

TorchServe runs one batch per worker at a time, so a prediction that arrives while
the worker integrates gradients for an explanation waits for it. With TorchServe's
``asyncCommunication`` the worker receives each request as it arrives instead;
this module lets a handler use that (docs/design.md, "Concurrent explanations"):

- :class:`MicroBatcher` groups the requests into batches (``max_batch_size``,
  ``max_delay_s``) and runs them one *prediction phase* at a time. A batch
  leaves the prediction lane when only explanation work is left
  (:meth:`Batch.leave_prediction_lane`) and then waits for the *explanation
  lane*, which one batch holds at a time. So the next batch's predictions run
  while the previous batch explains.
- :func:`shared_weights_copy` gives the explanation lane its own module tree over
  the same parameters and buffers. Explainers register forward hooks (captum's
  Layer IG replaces a layer's output through one); on the copy they never touch a
  prediction running on the original model in the other lane. No weight is copied.

Plain Python and PyTorch; no TorchServe import.
"""
from __future__ import annotations

import collections
import copy
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .errors import ConfigError


def check_async_batch_size(batch_size: int) -> None:
    """With ``asyncCommunication: true`` the frontend's ``batchSize`` must be 1: the worker
    batches requests itself; with larger frontend batches one coroutine would answer them
    all at once. Raises ConfigError otherwise (at load, and at build time)."""
    if batch_size != 1:
        raise ConfigError(f"asyncCommunication: true needs batchSize: 1 (got {batch_size}): the worker then "
                          "batches requests itself (explain.async_batch_size, async_max_batch_delay_ms)")


class Overloaded(Exception):
    """Raised by :meth:`MicroBatcher.submit` when ``max_pending`` requests are already in the worker."""


def shared_weights_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of ``module`` that shares every parameter and buffer with it.

    The copy's submodules are new objects (their own hook dictionaries), its
    tensors are the original's (same storage, same ``Parameter`` objects), so a
    hook registered on the copy never fires for the original and the copy costs
    no weight memory. Raises ``TypeError`` for modules ``copy.deepcopy`` cannot
    copy (TorchScript modules, for one).
    """
    memo = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
    originals = set(memo)  # before deepcopy adds what it copies to the memo
    try:
        clone = copy.deepcopy(module, memo)
    except Exception as exc:  # noqa: BLE001 - what deepcopy raises varies by module
        raise TypeError(f"{type(module).__name__} cannot be copied for the explanation lane: {exc}") from None
    for tensor in list(clone.parameters()) + list(clone.buffers()):
        if id(tensor) not in originals:  # a tensor reached by another path than parameters()/buffers()
            raise TypeError(f"{type(module).__name__}: the copy would not share tensor of shape "
                            f"{tuple(tensor.shape)} with the original")
    return clone


@dataclass
class Pending:
    """One submitted request: what the batch function gets, and where its answer goes."""

    item: Any
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


class Batch:
    """What the batch function sees: the items, a way to answer each, and the lane hand-over."""

    def __init__(self, pending: list[Pending], batcher: "MicroBatcher"):
        self._pending = pending
        self._batcher = batcher
        self.items = [p.item for p in pending]
        self.first_arrival = min(p.arrived for p in pending)
        self._in_prediction_lane = True
        self._holds_explanation_lane = False
        self.explanation_lane_wait_s = 0.0  # how long leave_prediction_lane waited for the explanation lane

    def deliver(self, index: int, answer: Any) -> None:
        """Answer item ``index`` now (once; later calls for it are ignored)."""
        future = self._pending[index].future
        if not future.done():
            try:
                future.set_result(answer)
            except InvalidStateError:  # cancelled meanwhile (its coroutine was)
                pass

    def delivered(self, index: int) -> bool:
        return self._pending[index].future.done()

    @property
    def in_prediction_lane(self) -> bool:
        """True until :meth:`leave_prediction_lane`."""
        return self._in_prediction_lane

    def leave_prediction_lane(self) -> None:
        """Let the next batch's prediction phase start, then wait for the explanation lane.

        Call it when only explanation work is left. Idempotent."""
        if self._in_prediction_lane:
            self._in_prediction_lane = False
            self._batcher._free_prediction_lane()
        if not self._holds_explanation_lane:
            began = time.perf_counter()
            self._batcher.explanation_lane.acquire()
            self._holds_explanation_lane = True
            self.explanation_lane_wait_s = time.perf_counter() - began

    def _close(self, error: Optional[BaseException]) -> None:
        for pending in self._pending:
            if not pending.future.done():
                try:
                    pending.future.set_exception(
                        error if error is not None else RuntimeError("the batch ended without answering this request"))
                except InvalidStateError:
                    pass
        if self._holds_explanation_lane:
            self._holds_explanation_lane = False
            self._batcher.explanation_lane.release()
        if self._in_prediction_lane:
            self._in_prediction_lane = False
            self._batcher._free_prediction_lane()


class MicroBatcher:
    """Batches requests submitted from any thread; see the module docstring.

    Args:
        run_batch: ``run_batch(batch)``, called on a thread of its own per batch.
            It answers every item with ``batch.deliver`` and calls
            ``batch.leave_prediction_lane()`` before explanation work. Items it
            leaves unanswered get an exception (its own, if it raised).
        max_batch_size: most items per batch.
        max_delay_s: how long a batch may wait for more items once the prediction lane is free
            and an item waits (TorchServe's ``maxBatchDelay``).
        max_pending: most items in the worker at once (queued or in a batch);
            :meth:`submit` raises :class:`Overloaded` past it.
    """

    def __init__(self, run_batch: Callable[[Batch], None], max_batch_size: int, max_delay_s: float,
                 max_pending: int, name: str = "batcher"):
        if max_batch_size < 1 or max_pending < 1 or max_delay_s < 0:
            raise ValueError("max_batch_size and max_pending must be positive, max_delay_s non-negative")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_pending = max_pending
        self.name = name
        self.explanation_lane = threading.Lock()
        self._queue: collections.deque[Pending] = collections.deque()
        self._condition = threading.Condition()
        self._prediction_lane_free = True
        self._in_worker = 0  # submitted and not yet answered
        self._dispatcher = threading.Thread(target=self._dispatch, name=f"{name}-dispatch", daemon=True)
        self._dispatcher.start()

    @property
    def in_worker(self) -> int:
        """Items submitted and not yet answered."""
        return self._in_worker

    def submit(self, item: Any) -> Future:
        """Queue ``item``; its answer (or exception) arrives on the returned future."""
        pending = Pending(item)
        with self._condition:
            if self._in_worker >= self.max_pending:
                raise Overloaded(f"{self._in_worker} requests are already in this worker (at most {self.max_pending})")
            self._in_worker += 1
            # answered, failed or cancelled: its place is free again (once, whichever comes first)
            pending.future.add_done_callback(self._answered)
            self._queue.append(pending)
            self._condition.notify_all()
        return pending.future

    def _answered(self, _future: Future) -> None:
        with self._condition:
            self._in_worker -= 1

    def _free_prediction_lane(self) -> None:
        with self._condition:
            self._prediction_lane_free = True
            self._condition.notify_all()

    def _dispatch(self) -> None:
        while True:
            with self._condition:
                while not (self._queue and self._prediction_lane_free):
                    self._condition.wait()
                # as TorchServe's maxBatchDelay: the batch closes when full or max_delay_s after the
                # lane was free with an item waiting (items queued meanwhile fill it first)
                close_at = time.monotonic() + self.max_delay_s
                while len(self._queue) < self.max_batch_size:
                    remaining = close_at - time.monotonic()
                    if remaining <= 0:
                        break
                    self._condition.wait(remaining)
                taken = [self._queue.popleft() for _ in range(min(self.max_batch_size, len(self._queue)))]
                self._prediction_lane_free = False
            batch = Batch(taken, self)
            threading.Thread(target=self._run, args=(batch,), name=f"{self.name}-batch", daemon=True).start()

    def _run(self, batch: Batch) -> None:
        error = None
        try:
            self.run_batch(batch)
        except BaseException as exc:  # noqa: BLE001 - every item must get an answer
            error = exc
        finally:
            batch._close(error)
