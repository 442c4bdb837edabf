"""The audit trail as the batch flow sees it: open, record a batch, close.

One ``AuditTrail`` per worker process (one writer, one chain). ``record`` is
called once per batch, with every explanation about to be answered, and returns
after the records are committed; thread-safe (the concurrent lane may call it).
The failure policy is applied here as far as it is pure: under ``on_failure:
fail`` a sink failure raises ``AuditUnavailable`` (a ``RequestError``, 503
``audit_unavailable``) and the flow answers it for those explanations; under
``serve`` it returns ``None`` in place of the ids, counts the records in
``lost_records``, logs one line, and the flow answers without ids and adds the
count to its ``AuditRecordsLost`` metric. Either way nothing is dropped without
a trace, and the chain stays whole: a failed batch takes no seq, and the head is
read back from the sink before the next write.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import uuid
from datetime import timedelta
from typing import Callable, Optional, Sequence

from tsexplain.serving.errors import RequestError

from .chain import Head, StoredRecord, link_hash
from .record import AuditEntry, ModelIdentity, canonical_json, input_description, record_body
from .settings import AuditSettings, redact
from .store import SqlStore, StoreError, WriterInfo, format_time, open_store, utc_now

logger = logging.getLogger(__name__)


class AuditUnavailable(RequestError):
    """The explanations of a batch could not be recorded (``on_failure: fail``): each gets this 503."""

    def __init__(self, count: int):
        super().__init__("the explanation could not be recorded in the audit trail; retry later",
                         "audit_unavailable")
        self.count = count


def make_writer_id(model_name: str) -> str:
    """``<model>@<host>:<pid>:<UTC start>:<random>``: unique per worker process, readable."""
    return (f"{model_name}@{socket.gethostname()}:{os.getpid()}:"
            f"{utc_now().strftime('%Y%m%dT%H%M%SZ')}:{secrets.token_hex(4)}")


class AuditTrail:
    """A worker's writer on the trail (see the package docstring for the interface)."""

    def __init__(self, settings: AuditSettings, model: ModelIdentity, writer_id: str,
                 store_factory: Callable[[], SqlStore]):
        self.settings = settings
        self.model = model
        self.writer = writer_id
        self.lost_records = 0  # records not written under on_failure: serve
        self.failed_records = 0  # records not written under on_failure: fail (their explanations got 503)
        self._store_factory = store_factory
        self._store: Optional[SqlStore] = None
        self._head: Optional[Head] = None  # None: read it from the sink before the next write
        self._lock = threading.Lock()
        self._info = WriterInfo(writer_id, model.name, model.version, model.mar_sha256, socket.gethostname(),
                                os.getpid(), format_time(utc_now()))

    @classmethod
    def open(cls, settings: AuditSettings, *, model_name: str, model_version: Optional[str] = None,
             mar_sha256: Optional[str] = None, writer_id: Optional[str] = None) -> "AuditTrail":
        """Connect, create the tables if needed, register this writer and apply retention.

        Raises ``StoreError`` when the sink cannot be opened and ``on_failure`` is ``fail``
        (the model then fails to load, loudly); under ``serve`` it logs and tries again at
        the first ``record``."""
        if not settings.enabled:
            raise ValueError("explain.audit.record is none: there is no trail to open")
        trail = cls(settings, ModelIdentity(model_name, model_version, mar_sha256),
                    writer_id or make_writer_id(model_name),
                    lambda: open_store(settings.sink, settings.timeout_ms, settings.sqlite_synchronous))
        try:
            with trail._lock:
                trail._ready()
        except StoreError as exc:
            if settings.on_failure == "fail":
                raise
            logger.error("audit trail unavailable at start (will retry): %s", exc)
            return trail
        if settings.retention_days is not None:
            trail.prune_retention()
        logger.info("audit trail open: sink=%s writer=%s record=%s keep_input=%s on_failure=%s",
                    trail.store_name, trail.writer, settings.record, settings.keep_input, settings.on_failure)
        return trail

    @property
    def store_name(self) -> str:
        return redact(self.settings.sink)

    def selects(self, priority: Optional[str]) -> bool:
        """Whether an explanation with this priority value is to be recorded."""
        return self.settings.selects(priority)

    def _ready(self) -> SqlStore:
        if self._store is None:
            self._store = self._store_factory()
            self._head = None
        if self._head is None:
            self._head = self._store.register_writer(self._info)
        return self._store

    def _drop_connection(self) -> None:
        if self._store is not None:
            self._store.close()
        self._store, self._head = None, None

    def record(self, entries: Sequence[AuditEntry]) -> list[Optional[str]]:
        """Commit one record per entry, in one transaction; their ids, in order.

        On a sink failure: raises ``AuditUnavailable`` (``on_failure: fail``), or returns
        ``None`` for every entry (``serve``). An entry that is not JSON data raises
        ``TypeError``/``ValueError`` before the sink is touched (a bug in the caller)."""
        if not entries:
            return []
        prepared = [(str(uuid.uuid4()), e) for e in entries]
        with self._lock:
            try:
                store = self._ready()
                rows = self._link(prepared, self._head)
                store.append(self.writer, rows, self._head)
            except StoreError as exc:
                self._drop_connection()  # reconnect and read the head back before the next write
                return self._failed(len(entries), exc)
            self._head = Head(self.writer, rows[-1].seq, rows[-1].hash)
        return [record_id for record_id, _ in prepared]

    def _link(self, prepared: list, head: Head) -> list[StoredRecord]:
        rows = []
        seq, prev = head.seq + 1, head.hash
        moment = format_time(utc_now())
        for record_id, entry in prepared:
            described, kept = input_description(entry.input_bytes, entry.content_type, self.settings.keep_input,
                                                self.settings.max_input_bytes)
            body = canonical_json(record_body(entry, record_id=record_id, writer=self.writer, seq=seq, time=moment,
                                              model=self.model, input_object=described))
            digest = link_hash(prev, body)
            rows.append(StoredRecord(record_id, self.writer, seq, moment, self.model.name, entry.method, entry.caller,
                                     described["sha256"], body, prev, digest, kept))
            seq, prev = seq + 1, digest
        return rows

    def _failed(self, count: int, exc: StoreError) -> list[Optional[str]]:
        if self.settings.on_failure == "fail":
            self.failed_records += count
            logger.error("audit write failed: count=%d model=%s writer=%s answered=503 reason=%s",
                         count, self.model.name, self.writer, exc)
            raise AuditUnavailable(count) from None
        self.lost_records += count
        logger.error("audit records lost: count=%d model=%s writer=%s total_lost=%d reason=%s",
                     count, self.model.name, self.writer, self.lost_records, exc)
        return [None] * count

    def prune_retention(self) -> int:
        """Prune records older than ``retention_days`` (logged); the number removed (0 on failure)."""
        cutoff = format_time(utc_now() - timedelta(days=self.settings.retention_days))
        with self._lock:
            try:
                result = self._ready().prune(cutoff)
            except StoreError as exc:
                self._drop_connection()
                logger.error("audit retention prune failed: %s", exc)
                return 0
        if result.records:
            logger.info("audit retention: pruned %d records of %d chains older than %s",
                        result.records, result.writers, cutoff)
        return result.records

    def close(self) -> None:
        """Mark this writer closed (best effort) and release the connection."""
        with self._lock:
            if self._store is not None:
                try:
                    self._store.close_writer(self.writer, format_time(utc_now()))
                except StoreError as exc:
                    logger.warning("audit trail close: %s", exc)
            self._drop_connection()
