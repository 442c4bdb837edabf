"""The batch flow's recording step: an audit record for every explanation served (issue #16).

The flow holds back the answer of every explanation the trail selects (computed or
from the cache) and calls :meth:`Recording.commit` once per batch, after the
batch's explanation work: the batch's records go in one transaction, and only then
are those answers released, each with its ``explanation_id``. So an answered
explanation always has its record, and predictions never wait for the write where
they can go early (``asyncCommunication``: the flow hands their rows over before it;
docs/audit.md, "Durability and failures"). If the sink fails, ``on_failure`` decides:
``fail`` answers those explanations 503 ``audit_unavailable``, ``serve`` answers them
without an id; either way the metrics count them (``AuditRecordsFailed``,
``AuditRecordsLost``) and the trail logs a line.

What a record holds is the trail's (:mod:`.audit.record`); what differs between
images and text (parameters, the heatmap kept beyond an overlay-only answer, the
input's media type) is the runner's. No TorchServe import.
"""
from __future__ import annotations

import logging
import time
from typing import Optional, Union

from .audit import AuditEntry, AuditTrail, AuditUnavailable
from .errors import RequestError
from .runners.base import Item, Runner

logger = logging.getLogger(__name__)
# The key under which a cached explanation keeps what its record needs beyond the answer
# (Runner.record_extras): a hit recorded later finds it there. Never answered.
RECORD_ONLY = "record_only"


def route_of(item: Item) -> str:
    """Where ``item`` came in: ``explanations``, ``kserve_v1``, ``kserve_v2`` or ``legacy``."""
    row = item.unit.row
    if row.plain:
        return "explanations"
    return f"kserve_{row.kserve.protocol}" if row.kserve is not None else "legacy"


class Recording:
    """A model's trail as the flow uses it: which explanations to record, and the commit."""

    def __init__(self, trail: AuditTrail, runner: Runner):
        self.trail = trail
        self.runner = runner

    def selects(self, item: Item) -> bool:
        """Whether ``item``'s explanation is recorded (``record: all``, or one of its priority
        values is in ``explain.audit.priority_values``)."""
        return self.trail.selects(None) or any(self.trail.selects(p) for p in item.priorities)

    def entry(self, item: Item) -> AuditEntry:
        """``item``'s explanation, as answered, described for the trail."""
        explanation = item.explanation
        chosen = [p for p in item.priorities if self.trail.selects(p)] or list(item.priorities) or [None]
        return AuditEntry(
            route=route_of(item), method=item.method, target=explanation.get("target"),
            contrast=explanation.get("contrast"), parameters=self.runner.record_parameters(item, explanation),
            predictions=[{"index": i, "label": label, "probability": p} for i, label, p in item.ranked],
            explanation={**explanation, **(item.record_extras or {})},
            input_bytes=self.runner.cache_input(item), content_type=self.runner.input_content_type(item),
            elapsed_ms=explanation.get("elapsed_ms"), priority=chosen[0], caller=item.caller,
            request_id=item.unit.row.request_id or None)

    def commit(self, items: list[Item], metrics) -> list[Union[str, None, RequestError]]:
        """Record ``items``' explanations in one transaction. Per item: its record's id, ``None``
        (lost under ``on_failure: serve``: answer it without an id), or the error to answer
        (``on_failure: fail``). Counted by method in ``metrics``."""
        entries = [self.entry(item) for item in items]
        began = time.perf_counter()
        try:
            ids: list[Optional[str]] = self.trail.record(entries)
        except AuditUnavailable as exc:  # the trail has logged it
            for item in items:
                metrics.count("AuditRecordsFailed", method=item.method)
            return [exc] * len(items)
        for item, record_id in zip(items, ids):
            metrics.count("AuditRecordsWritten" if record_id is not None else "AuditRecordsLost", method=item.method)
        written = sum(record_id is not None for record_id in ids)
        logger.info("audit records written=%d lost=%d write_ms=%.1f", written, len(ids) - written,
                    (time.perf_counter() - began) * 1000)
        return ids
