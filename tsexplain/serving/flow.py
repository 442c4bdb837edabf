"""One batch, from requests to answers: parse, gate, cache, forward, explain, render.

The batch is an explicit :class:`Batch` passed along, with named index spaces:

- a **row** is one TorchServe request of the batch (``Row``; TorchServe answers rows);
- a **unit** is one thing answered as if alone (``Unit``): a plain request, or one
  instance of a KServe v1/v2 request (a row of several units);
- an **item** is a unit that parsed (:class:`~.runners.base.Item`), what the runner
  works on. Runner calls take lists of items; positions in them mean nothing else.

Every unit gets its own answer (status and JSON body): a bad request its 4xx, a
failed explanation its 5xx, and the others go on. With the audit trail on, the
explanations it selects are answered only once the batch's records are committed
(:mod:`.recording`, called at one point: ``_commit``). The model-specific steps are the
runner's (:class:`~.runners.base.Runner`); everything here is shared by every runner.
No TorchServe import: ``handlers/ts_glue.py`` turns TorchServe's batch into rows and
the rows' answers back.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from ..attr.errors import AttributionInputError
from . import kserve
from .answers import Answer, envelope, ranked_rows
from .cache import PREDICTED, ExplanationCache, cache_key
from .deadline import Deadline, DeadlineExceeded, enforce
from .errors import RequestError, explanation_error
from .policy import EXPLANATIONS, KSERVE, ExplanationGate
from .recording import RECORD_ONLY, Recording
from .runners.base import Item, Runner
from .schema import effective, parse, request_body, resolve_target
from .settings import ModelSettings

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Row:
    """One TorchServe request of the batch, as the glue hands it over.

    ``explain``: it came through an explanation route. ``plain``: through
    ``/predictions`` or ``/explanations`` (their protocol), not a KServe or legacy
    route (where a KServe body is split into instances).
    """

    body: Mapping[str, Any]  # TorchServe's row: {"body": ...} or {"data": ...}
    headers: Mapping[str, str]  # lower-case names
    explain: bool = False
    plain: bool = True
    request_id: str = ""
    answer: Optional[Answer] = None
    kserve: Optional[kserve.KServeRequest] = None
    units: list = field(default_factory=list)


@dataclass(eq=False)
class Unit:
    """One thing answered as if alone: a plain request or one KServe instance of ``row``."""

    row: Row
    body: Mapping[str, Any]
    answer: Optional[Answer] = None

    @property
    def route(self) -> Optional[str]:
        """The explanation route it came through, or None for a prediction."""
        if not self.row.explain:
            return None
        return EXPLANATIONS if self.row.plain else KSERVE


@dataclass
class Batch:
    """The state of one batch as it goes through the flow."""

    rows: list[Row]
    started: float  # time.monotonic() when its first request reached the worker: deadlines count from here
    metrics: "Metrics"  # where this batch's counts go
    units: list[Unit] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    granted: int = 0  # explanations the gate let through
    handed_over: int = 0  # rows answered before the batch's explanation work (on_ready)
    held: list = field(default_factory=list)  # explained items whose answers wait for their audit records

    def complete_rows(self) -> list[Row]:
        """Rows whose every unit is answered."""
        return [row for row in self.rows if row.answer is not None or all(u.answer is not None for u in row.units)]


class Metrics:
    """Where the flow counts (no-op here; the glue's records TorchServe metrics). Every metric
    has the dimension ``Method`` (the request's method, else the model's default); ``dimensions``
    adds others, in order (``ExplanationsDenied``: ``Reason``, one of ``policy.DENIAL_CAUSES``)."""

    def count(self, name: str, value: float = 1, method: Optional[str] = None, **dimensions: str) -> None:
        pass

    def time(self, name: str, ms: float, method: Optional[str] = None) -> None:
        pass


class ExplainFlow:
    """Answers batches for one model: its runner, settings, gate and cache.

    Args:
        runner: the model-specific steps.
        settings: the model's settings.
        gate: who may get an explanation.
        cache: the explanation cache (``ExplanationCache(0, 0)``: off).
        metrics: where counts and times go.
        model_name, model_version: the MAR's (KServe v2 answers).
        cache_version: what cache keys carry for the model (:func:`~.cache.model_version`:
            the MAR's version and a hash of its files; needed when the cache is on).
        concurrent: explanations run after the batch's predictions are answered, in the
            explanation lane (``asyncCommunication``): no explanation is fused into the
            prediction forward.
        trail: the audit trail (``None``: off); the recording step is :mod:`.recording`'s.
    """

    def __init__(self, runner: Runner, settings: ModelSettings, gate: ExplanationGate, cache: ExplanationCache,
                 metrics: Optional[Metrics] = None, model_name: str = "", model_version: Optional[str] = None,
                 cache_version: str = "", concurrent: bool = False, trail=None):
        self.runner = runner
        self.settings = settings
        self.gate = gate
        self.cache = cache
        self.model_version = model_version
        self.cache_version = cache_version
        self.metrics = metrics or Metrics()
        self.model_name = model_name
        self.concurrent = concurrent
        self.recording = Recording(trail, runner) if trail is not None else None
        self._defaults = settings.by_key()
        self._limits = settings.limits()
        # every setting is part of the cache key: env overrides change answers without changing the MAR
        self._settings_key = {"handler": dataclasses.asdict(settings.handler),
                              "explain": dataclasses.asdict(settings.explain)}

    # -- the batch ---------------------------------------------------------------

    def run(self, rows: list[Row], started: Optional[float] = None,
            on_ready: Optional[Callable[[list[Row]], None]] = None, metrics: Optional[Metrics] = None) -> list[Row]:
        """Answer every row (``row.answer``). ``started``: when the batch's first request
        reached the worker (``time.monotonic``; default now). ``on_ready(rows)`` is called
        once, before the batch's remaining explanation work and audit records, with the
        rows whose answers are complete then (none holds an explanation to record).
        ``metrics``: where this batch counts (default: the flow's).
        Never raises: a failure answers the units it reached with a 503."""
        batch = Batch(rows, time.monotonic() if started is None else started, metrics or self.metrics)
        try:
            self._split(batch)
            self._parse(batch)
            if batch.items:
                self._answer_items(batch, on_ready)
        except Exception as exc:  # noqa: BLE001 - every unit must get an answer; the worker goes on
            logger.exception("batch failed: %s", type(exc).__name__)
            for unit in batch.units:
                if unit.answer is None:
                    unit.answer = Answer.error(RequestError("the request failed on the server", "server_error"))
        for row in rows:
            self._finish(row)
        logger.info("batch size=%d explained=%d answered_early=%d", len(rows), batch.granted, batch.handed_over)
        kserve_rows = [row for row in rows if row.kserve is not None]
        if kserve_rows:
            logger.info("kserve requests=%d instances=%d", len(kserve_rows), sum(len(r.units) for r in kserve_rows))
        return rows

    def _split(self, batch: Batch) -> None:
        """Rows into units: a KServe request's instances, or the row itself."""
        for row in batch.rows:
            try:
                row.kserve = None if row.plain else self._kserve_request(row)
            except RequestError as error:
                row.answer = Answer.of(kserve.error_entry(error.to_json()), error.status)
                continue
            bodies = [row.body] if row.kserve is None else [{"body": i} for i in row.kserve.instances]
            row.units = [Unit(row, body) for body in bodies]
            batch.units.extend(row.units)

    def _kserve_request(self, row: Row) -> Optional[kserve.KServeRequest]:
        """The KServe request in ``row`` (not on a plain route), or None for a plain body."""
        try:
            body = kserve.detect(request_body(row.body))
        except RequestError:  # no body: the unit's parsing answers it
            return None
        return None if body is None else kserve.split_request(body, self.settings.explain.max_instances)

    def _parse(self, batch: Batch) -> None:
        """Each unit parsed, checked and gated into an item, or answered with its error."""
        explain = self.settings.explain
        for unit in batch.units:
            try:
                item = self._item(unit)
                if unit.route is not None:
                    decision = self.gate.decide(unit.row.headers, item.request.priority, batch.granted, unit.route)
                    if decision.allowed:
                        item.explain, batch.granted = True, batch.granted + 1
                        item.caller, item.priorities = decision.caller, decision.priorities
                        limit = item.options["deadline_ms"]
                        item.deadline = None if limit is None else Deadline(limit, batch.started)
                    else:
                        batch.metrics.count("ExplanationsDenied", method=item.method, Reason=decision.cause)
                        if explain.on_denied == "reject":
                            raise RequestError(decision.reason, decision.kind)
                        item.skipped = decision.reason
                batch.items.append(item)
            except RequestError as error:
                unit.answer = Answer.error(error)

    def _item(self, unit: Unit) -> Item:
        """``unit``'s request parsed, with its options and classes, its input prepared."""
        explain, labels = self.settings.explain, self.runner.labels
        request = parse(unit.body, self.runner.modality, self._limits)
        for name in request.given:
            if not explain.allows_override(name) and name in explain.override_fields:
                raise RequestError(f"'{name}' may not be set in requests to this model", "override_not_allowed")
        options = effective(request, self._defaults)
        if options["method"] not in explain.methods:
            raise RequestError(f"method {options['method']!r} is not allowed for this model; allowed: "
                               f"{list(explain.methods)}", "method_not_allowed")
        if unit.route is not None and options["method"] in self.runner.unsupported_methods:
            raise RequestError(self.runner.unsupported_methods[options["method"]], "method_unsupported")
        asked = request.deadline_ms
        if asked is not None and explain.deadline_ms is not None and asked > explain.deadline_ms:
            raise RequestError(f"'deadline_ms' may be at most {explain.deadline_ms} for this model", "bad_deadline_ms")
        target = resolve_target(request.target, labels)
        contrast = resolve_target(request.contrast, labels, "contrast")
        if contrast is not None and contrast == target:
            raise RequestError("'contrast' must differ from 'target'", "bad_contrast")
        item = Item(unit, request, options, target, contrast)
        self.runner.prepare(item)
        return item

    # -- model work --------------------------------------------------------------

    def _answer_items(self, batch: Batch, on_ready) -> None:
        runner, items = self.runner, batch.items
        explained = [item for item in items if item.explain]
        lookup_ms = self._look_up(explained)
        fused = [] if self.concurrent else [i for i in explained if i.cached is None and i.method in runner.fused_methods]
        probabilities = self._forward(batch, fused)
        for item, row in zip(items, probabilities.argmax(dim=1).tolist()):
            item.predicted = row
        rankings = ranked_rows(probabilities, runner.labels, [runner.prediction_top_k(i) for i in items])
        for item, ranked in zip(items, rankings):
            item.ranked = ranked
        self._check_hits(batch, explained)

        pending = []
        for item in explained:
            if item.cached is not None or item.error is not None:
                continue
            if item.result is None:  # fused explanations know their class already
                item.explained_class = item.predicted if item.target is None else item.target
            if item.contrast is not None and item.contrast == item.explained_class:
                item.error, item.result = RequestError("'contrast' is the predicted class; name another class",
                                                       "bad_contrast"), None
            elif item.result is None:
                pending.append(item)
        waiting = set(map(id, pending))
        for item in items:
            if id(item) not in waiting:
                self._answer(batch, item, lookup_ms)
        if (pending or batch.held) and on_ready is not None:  # explanation work or audit records left
            ready = [self._finish(row) for row in batch.complete_rows()]
            batch.handed_over = len(ready)
            on_ready(ready)
        groups: dict = {}
        for item in pending:
            groups.setdefault(runner.group_key(item), []).append(item)
        for group in groups.values():
            self._explain(batch, group)
        for item in pending:
            self._answer(batch, item, lookup_ms)
        if batch.held:
            self._commit(batch)

    def _look_up(self, explained: list[Item]) -> float:
        """Cache lookups of the explained items (no forward needed: a request without a
        target is keyed on "the predicted class"). Returns the time they took, in ms."""
        if not self.cache.enabled or not explained:
            return 0.0
        began = time.perf_counter()
        fields = self.runner.explanation_fields
        for item in explained:
            params = {name: item.options[name] for name in fields} | {"contrast": item.contrast}
            item.cache_key = cache_key(self.runner.cache_input(item), self.cache_version, item.method,
                                       PREDICTED if item.target is None else item.target,
                                       {"settings": self._settings_key, "request": _jsonable(params)})
            item.cached = self.cache.get(item.cache_key)
        return (time.perf_counter() - began) * 1000

    def _check_hits(self, batch: Batch, explained: list[Item]) -> None:
        """Count hits and misses. A hit for a request without a target is used only when
        it explains the class this forward predicts: a near-tie can flip with the batch's
        company, and an answer must never pair the predictions with a map of another
        class. An unusable hit counts as a miss; the fresh explanation replaces it."""
        for item in explained:
            if item.cache_key is None:
                continue
            if item.cached is not None and item.target is None \
                    and item.cached["target"]["index"] != item.predicted:
                self.cache.reject()
                item.cached = None
            batch.metrics.count("ExplanationCacheHits" if item.cached is not None else "ExplanationCacheMisses",
                                method=item.method)

    def _forward(self, batch: Batch, fused: list[Item]) -> torch.Tensor:
        """The prediction forward, with the fused explanations when there are any: these
        fail alone (fault, deadline, error) and the predictions are then run without them."""
        if fused:
            began = time.perf_counter()
            try:
                self._inject_fault()
                done, probabilities, late = self._within_deadlines(
                    batch, fused, lambda some: self.runner.forward(batch.items, some))
            except Exception as exc:  # noqa: BLE001 - the explanations fail alone; predictions go on
                self._failed(batch, fused, exc)
                done, probabilities, late = [], None, {}
            for item, error in late.items():
                item.error, item.result = error, None
            elapsed = (time.perf_counter() - began) * 1000
            for item in done:
                item.elapsed_ms = elapsed
            if probabilities is not None:
                return probabilities
        return self.runner.forward(batch.items, [])

    def _explain(self, batch: Batch, group: list[Item]) -> None:
        """One group's explanations (``item.result``), each request within its deadline; a
        failure fails the group alone, an input error only its own item."""
        began = time.perf_counter()
        try:
            self._inject_fault()
            done, results, late = self._within_deadlines(batch, group, self.runner.explain)
        except AttributionInputError as exc:
            if len(group) > 1:  # one bad input: explain one by one so that only it fails
                for item in group:
                    self._explain(batch, [item])
            else:
                group[0].error = explanation_error(exc)
            return
        except Exception as exc:  # noqa: BLE001 - the explanation fails alone; predictions go on
            self._failed(batch, group, exc)
            return
        elapsed = (time.perf_counter() - began) * 1000
        for item, error in late.items():
            item.error = error
        for item, result in zip(done, results or []):
            item.result, item.elapsed_ms = result, elapsed

    def _within_deadlines(self, batch: Batch, items: list[Item], work):
        """Run ``work(items)`` with each item within its own deadline.

        Items already past their deadline get a 504 error. The work runs under the
        earliest deadline of the others; when it is stopped there, it runs again for
        those still in time (so a request never fails for another's deadline).
        Returns ``(items done, what work returned or None, {item: RequestError})``.
        """
        late: dict = {}
        pending = list(items)
        result = None
        while pending:
            for item in [i for i in pending if i.deadline is not None and i.deadline.expired()]:
                late[item] = explanation_error(DeadlineExceeded(item.deadline.limit_ms, 0), item.deadline.limit_ms)
                pending.remove(item)
            if not pending:
                break
            earliest = min((i.deadline for i in pending if i.deadline is not None), key=lambda d: d.end, default=None)
            try:
                with enforce(earliest):
                    result = work(pending)
                break
            except DeadlineExceeded:
                continue  # the earliest deadline passed: answer it, run again for the others
        if late:
            batch.metrics.count("ExplanationsTimedOut", len(late))
            logger.warning("explanation deadline exceeded: %d request(s), limits_ms=%s", len(late),
                           sorted({i.deadline.limit_ms for i in late}))
        return pending, (result if pending else None), late

    def _failed(self, batch: Batch, items: list[Item], exc: BaseException) -> None:
        logger.error("explanation failed: %s", type(exc).__name__)
        error = explanation_error(exc)
        for item in items:
            item.error, item.result = error, None
            batch.metrics.count("ExplanationsFailed", method=item.method)

    def _inject_fault(self) -> None:
        """Raise the failure ``explain.inject_fault`` asks for (tests of failure isolation)."""
        fault = self.settings.explain.inject_fault
        if fault == "oom":
            raise RuntimeError("CUDA out of memory (injected by explain.inject_fault)")
        if fault == "error":
            raise RuntimeError("failure injected by explain.inject_fault")

    # -- answers -----------------------------------------------------------------

    def _answer(self, batch: Batch, item: Item, lookup_ms: float) -> None:
        """``item.unit``'s answer from what is known of it now."""
        if not item.explain:
            if item.skipped is not None:  # asked for an explanation, denied: the envelope with null
                item.unit.answer = Answer.of(envelope(item.ranked, None, item.skipped))
            else:  # the stock {label: probability} body
                item.unit.answer = Answer.of({label: p for _, label, p in item.ranked})
            return
        if item.error is not None:
            item.unit.answer = Answer.error(item.error)
            return
        if item.cached is not None:
            explanation = item.cached
            item.record_extras = explanation.pop(RECORD_ONLY, None)
            explanation.update(cached=True, elapsed_ms=round(lookup_ms, 2))
        else:
            began = time.perf_counter()
            explanation = self.runner.render(item)
            if self.recording is not None:  # kept in the cache too, for a hit recorded later
                item.record_extras = self.runner.record_extras(item, explanation)
            if item.cache_key is not None:
                self.cache.put(item.cache_key, {**explanation, RECORD_ONLY: item.record_extras}
                               if item.record_extras else explanation)
            elapsed = item.elapsed_ms + (time.perf_counter() - began) * 1000
            explanation.update(cached=False, elapsed_ms=round(elapsed, 2))
        item.explanation = explanation
        if self.recording is not None and self.recording.selects(item):
            batch.held.append(item)  # answered once its record is committed (_commit)
        else:
            self._serve(batch, item)

    def _commit(self, batch: Batch) -> None:
        """The recording step: the batch's held explanations recorded in one transaction, then
        answered, each with its ``explanation_id`` (or 503 / no id, as ``on_failure`` says)."""
        for item, outcome in zip(batch.held, self.recording.commit(batch.held, batch.metrics)):
            if isinstance(outcome, RequestError):
                item.unit.answer = Answer.error(outcome)
            else:
                self._serve(batch, item, outcome)

    def _serve(self, batch: Batch, item: Item, explanation_id: Optional[str] = None) -> None:
        """``item``'s explanation answered; metrics and one log line (no payloads, no values)."""
        explanation, method = item.explanation, item.method
        if explanation_id is not None:
            explanation["explanation_id"] = explanation_id
        item.unit.answer = Answer.of(envelope(item.ranked, explanation))
        batch.metrics.count("ExplanationsServed", method=method)
        batch.metrics.time("ExplanationLatency", explanation["elapsed_ms"], method=method)
        detail = " ".join(f"{k}={explanation[k]}" for k in self.runner.log_fields if explanation.get(k) is not None)
        logger.info("explanation method=%s %s%s elapsed_ms=%.2f", method, detail,
                    " cached=True" if explanation["cached"] else "", explanation["elapsed_ms"])

    def _finish(self, row: Row) -> Row:
        """``row.answer`` from its units' answers (once)."""
        if row.answer is not None:
            return row
        if row.kserve is None:
            row.answer = row.units[0].answer
            return row
        results = [(u.answer.status, u.answer.body) for u in row.units]
        entries = [json.loads(body) if status == 200 else kserve.error_entry(json.loads(body))
                   for status, body in results]
        body = kserve.response(row.kserve, row.explain, entries, request_id=row.request_id,
                               model_name=self.model_name, model_version=self.model_version)
        row.answer = Answer.of(body, kserve.overall_status([status for status, _ in results]))
        return row


def _jsonable(params: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}

