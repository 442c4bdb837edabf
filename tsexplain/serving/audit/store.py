"""The trail's tables and the SQL that SQLite and PostgreSQL share.

Tables (``audit_`` prefix, so the trail can share a PostgreSQL database):

- ``audit_records``: one row per record: the finding columns (``id``, ``writer``,
  ``seq``, ``time``, ``model``, ``method``, ``caller``, ``input_sha256``), the
  canonical ``body`` the chain hashes, ``prev_hash``, ``hash``, and the kept
  ``input`` bytes (NULL when not kept). ``UNIQUE (writer, seq)``.
- ``audit_writers``: one row per writer (worker process): model, version, MAR hash,
  host, pid, start time, and its head (last seq and hash), updated in the same
  transaction as its records.
- ``audit_anchors``: one row per pruned chain: where it starts again.
- ``audit_meta``: the schema version.

``time`` is text, ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (UTC, fixed width), so it sorts
and compares as text in both databases. A subclass supplies the connection, the
placeholder style, the binary type and the transactions (``sqlite.py``,
``postgres.py``); every database error leaves this layer as ``StoreError``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Optional, Sequence

from .chain import GENESIS, Anchor, Head, Report, StoredRecord, check_heads, verify
from .settings import redact, sink_kind, sqlite_path

SCHEMA_VERSION = "1"
RECORD_COLUMNS = ("id", "writer", "seq", "time", "model", "method", "caller", "input_sha256",
                  "body", "prev_hash", "hash", "input")
PRUNE_CHUNK = 2000  # records removed per transaction, so writers never wait long behind a prune


class StoreError(Exception):
    """The sink could not be reached or refused a statement. The message names the
    sink without its password and never holds record content."""


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def format_time(moment: datetime) -> str:
    """``YYYY-MM-DDTHH:MM:SS.ffffffZ``: the trail's fixed-width UTC text."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class WriterInfo:
    writer: str
    model: str
    model_version: Optional[str]
    mar_sha256: Optional[str]
    host: str
    pid: int
    started_at: str


@dataclass(frozen=True)
class Filters:
    """What ``list`` and ``export`` select (``None``: any). ``since``/``until`` are trail times."""

    model: Optional[str] = None
    since: Optional[str] = None
    until: Optional[str] = None
    input_sha256: Optional[str] = None
    caller: Optional[str] = None
    method: Optional[str] = None
    writer: Optional[str] = None

    def where(self) -> tuple[str, list]:
        clauses, params = [], []
        for column, op, value in (("model", "=", self.model), ("time", ">=", self.since), ("time", "<", self.until),
                                  ("input_sha256", "=", self.input_sha256), ("caller", "=", self.caller),
                                  ("method", "=", self.method), ("writer", "=", self.writer)):
            if value is not None:
                clauses.append(f"{column} {op} ?")
                params.append(value)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


@dataclass
class PruneResult:
    records: int = 0
    writers: int = 0


class SqlStore:
    """The shared SQL; subclasses set the dialect hooks below."""

    blob_type = "BLOB"
    int_type = "BIGINT"

    def __init__(self, url: str, timeout_ms: int):
        self.url = url
        self.name = redact(url)
        self.timeout_ms = timeout_ms

    # -- dialect hooks -------------------------------------------------------------------------
    def sql(self, text: str) -> str:
        return text

    @contextlib.contextmanager
    def write(self):
        """A cursor in a write transaction, committed when the block ends without error."""
        raise NotImplementedError

    @contextlib.contextmanager
    def read(self):
        """A cursor in a read transaction that sees one snapshot."""
        raise NotImplementedError

    def stream(self, cur, text: str, params: Sequence = ()) -> Iterator[tuple]:
        cur.execute(self.sql(text), params)
        yield from cur

    def lock_schema(self, cur) -> None:
        """Serialise concurrent schema creation (PostgreSQL)."""

    def lock_writer(self, cur, writer: str) -> None:
        """Serialise concurrent prunes of one chain (PostgreSQL; SQLite's write lock does it)."""

    def close(self) -> None:
        raise NotImplementedError

    def wrap(self, exc: BaseException) -> StoreError:
        return StoreError(f"audit sink {self.name}: {type(exc).__name__}: {str(exc).strip()}")

    # -- schema ----------------------------------------------------------------------------------
    def schema_version(self) -> Optional[str]:
        """The trail's schema version, or ``None`` when its tables are not there yet."""
        try:
            with self.read() as cur:
                cur.execute(self.sql("SELECT value FROM audit_meta WHERE key = 'schema_version'"))
                row = cur.fetchone()
                return None if row is None else row[0]
        except Exception:
            return None

    def ensure_schema(self) -> None:
        """Create the tables unless they are there: a role with no CREATE privilege (a
        worker's, on PostgreSQL) can use a trail whose tables its owner created."""
        if self.schema_version() == SCHEMA_VERSION:
            return
        statements = [
            "CREATE TABLE IF NOT EXISTS audit_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            f"""CREATE TABLE IF NOT EXISTS audit_writers (
                writer TEXT PRIMARY KEY, model TEXT NOT NULL, model_version TEXT, mar_sha256 TEXT,
                host TEXT, pid {self.int_type}, started_at TEXT NOT NULL,
                head_seq {self.int_type} NOT NULL, head_hash TEXT NOT NULL, closed_at TEXT)""",
            f"""CREATE TABLE IF NOT EXISTS audit_records (
                id TEXT PRIMARY KEY, writer TEXT NOT NULL, seq {self.int_type} NOT NULL, time TEXT NOT NULL,
                model TEXT NOT NULL, method TEXT NOT NULL, caller TEXT, input_sha256 TEXT NOT NULL,
                body TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL, input {self.blob_type},
                UNIQUE (writer, seq))""",
            "CREATE INDEX IF NOT EXISTS audit_records_time ON audit_records (time)",
            "CREATE INDEX IF NOT EXISTS audit_records_model_time ON audit_records (model, time)",
            "CREATE INDEX IF NOT EXISTS audit_records_input ON audit_records (input_sha256)",
            f"""CREATE TABLE IF NOT EXISTS audit_anchors (
                writer TEXT PRIMARY KEY, seq {self.int_type} NOT NULL, prev_hash TEXT NOT NULL,
                cutoff TEXT NOT NULL, pruned_at TEXT NOT NULL, pruned {self.int_type} NOT NULL)""",
        ]
        try:
            with self.write() as cur:
                self.lock_schema(cur)
                for statement in statements:
                    cur.execute(statement)
                cur.execute(self.sql("SELECT value FROM audit_meta WHERE key = 'schema_version'"))
                row = cur.fetchone()
                if row is None:
                    cur.execute(self.sql("INSERT INTO audit_meta (key, value) VALUES ('schema_version', ?)"),
                                (SCHEMA_VERSION,))
                elif row[0] != SCHEMA_VERSION:
                    raise StoreError(f"audit sink {self.name}: schema version {row[0]}, this code knows {SCHEMA_VERSION}")
        except StoreError:
            raise
        except Exception as exc:
            raise self.wrap(exc) from None

    # -- writing ---------------------------------------------------------------------------------
    def register_writer(self, info: WriterInfo) -> Head:
        """Add ``info.writer`` (or find it again) and return its head."""
        try:
            with self.write() as cur:
                cur.execute(self.sql("SELECT head_seq, head_hash FROM audit_writers WHERE writer = ?"), (info.writer,))
                row = cur.fetchone()
                if row is not None:
                    return Head(info.writer, int(row[0]), row[1])
                cur.execute(self.sql(
                    "INSERT INTO audit_writers (writer, model, model_version, mar_sha256, host, pid, started_at, "
                    "head_seq, head_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                    (info.writer, info.model, info.model_version, info.mar_sha256, info.host, info.pid,
                     info.started_at, -1, GENESIS))
                return Head(info.writer, -1, GENESIS)
        except Exception as exc:
            raise self.wrap(exc) from None

    def append(self, writer: str, records: Sequence[StoredRecord], expected: Head) -> None:
        """Insert ``records`` (the next links of ``writer``'s chain after ``expected``) and move
        the head, in one transaction. ``StoreError`` when the head moved meanwhile: nothing is written."""
        if not records:
            return
        last = records[-1]
        try:
            with self.write() as cur:
                cur.executemany(self.sql(
                    f"INSERT INTO audit_records ({', '.join(RECORD_COLUMNS)}) VALUES ({', '.join('?' * len(RECORD_COLUMNS))})"),
                    [tuple(getattr(r, c) for c in RECORD_COLUMNS) for r in records])
                cur.execute(self.sql(
                    "UPDATE audit_writers SET head_seq = ?, head_hash = ? "
                    "WHERE writer = ? AND head_seq = ? AND head_hash = ?"),
                    (last.seq, last.hash, writer, expected.seq, expected.hash))
                if cur.rowcount != 1:
                    raise StoreError(f"audit sink {self.name}: writer {writer}'s head is not seq {expected.seq} "
                                     "any more; nothing written")
        except StoreError:
            raise
        except Exception as exc:
            raise self.wrap(exc) from None

    def close_writer(self, writer: str, moment: str) -> None:
        try:
            with self.write() as cur:
                cur.execute(self.sql("UPDATE audit_writers SET closed_at = ? WHERE writer = ?"), (moment, writer))
        except Exception as exc:
            raise self.wrap(exc) from None

    # -- reading ---------------------------------------------------------------------------------
    @staticmethod
    def _record(row: Sequence[Any]) -> StoredRecord:
        values = dict(zip(RECORD_COLUMNS, row))
        values["seq"] = int(values["seq"])
        if values["input"] is not None:
            values["input"] = bytes(values["input"])
        return StoredRecord(**values)

    def get(self, record_id: str) -> Optional[StoredRecord]:
        try:
            with self.read() as cur:
                cur.execute(self.sql(f"SELECT {', '.join(RECORD_COLUMNS)} FROM audit_records WHERE id = ?"),
                            (record_id,))
                row = cur.fetchone()
        except Exception as exc:
            raise self.wrap(exc) from None
        return None if row is None else self._record(row)

    def records(self, filters: Filters = Filters(), newest_first: bool = False,
                limit: Optional[int] = None) -> Iterator[StoredRecord]:
        """Records matching ``filters`` by time (then writer and seq), streamed."""
        where, params = filters.where()
        order = "DESC" if newest_first else "ASC"
        text = (f"SELECT {', '.join(RECORD_COLUMNS)} FROM audit_records{where} "
                f"ORDER BY time {order}, writer {order}, seq {order}")
        if limit is not None:
            text += f" LIMIT {int(limit)}"
        try:
            with self.read() as cur:
                for row in self.stream(cur, text, params):
                    yield self._record(row)
        except GeneratorExit:
            raise
        except Exception as exc:
            raise self.wrap(exc) from None

    def heads(self, cur) -> dict[str, Head]:
        cur.execute(self.sql("SELECT writer, head_seq, head_hash FROM audit_writers"))
        return {w: Head(w, int(s), h) for w, s, h in cur.fetchall()}

    def anchors(self, cur) -> dict[str, Anchor]:
        cur.execute(self.sql("SELECT writer, seq, prev_hash, cutoff, pruned_at, pruned FROM audit_anchors"))
        return {w: Anchor(w, int(s), p, c, t, int(n)) for w, s, p, c, t, n in cur.fetchall()}

    def writers(self) -> list[dict]:
        try:
            with self.read() as cur:
                cur.execute(self.sql("SELECT writer, model, model_version, mar_sha256, host, pid, started_at, "
                                     "head_seq, head_hash, closed_at FROM audit_writers ORDER BY started_at, writer"))
                names = ("writer", "model", "model_version", "mar_sha256", "host", "pid", "started_at",
                         "head_seq", "head_hash", "closed_at")
                return [dict(zip(names, row)) for row in cur.fetchall()]
        except Exception as exc:
            raise self.wrap(exc) from None

    def verify(self, progress: Optional[Callable[[int], None]] = None,
               saved_heads: Optional[Sequence[dict]] = None) -> tuple[Report, list[Head]]:
        """Every chain checked in one snapshot; also against ``saved_heads`` when given.
        Returns the report and the current heads."""
        try:
            with self.read() as cur:
                heads, anchors = self.heads(cur), self.anchors(cur)
                rows = self.stream(cur, f"SELECT {', '.join(RECORD_COLUMNS)} FROM audit_records ORDER BY writer, seq")
                report = verify((self._record(r) for r in rows), heads, anchors, progress)
                if saved_heads is not None:
                    def lookup(writer: str, seq: int) -> Optional[StoredRecord]:
                        cur.execute(self.sql(f"SELECT {', '.join(RECORD_COLUMNS)} FROM audit_records "
                                             "WHERE writer = ? AND seq = ?"), (writer, seq))
                        row = cur.fetchone()
                        return None if row is None else self._record(row)
                    report.breaks.extend(check_heads(saved_heads, anchors, lookup))
        except Exception as exc:
            raise self.wrap(exc) from None
        return report, sorted(heads.values(), key=lambda h: h.writer)

    # -- retention -------------------------------------------------------------------------------
    def prune(self, cutoff: str, dry_run: bool = False,
              progress: Optional[Callable[[int], None]] = None) -> PruneResult:
        """Remove, chain by chain, the oldest records up to the chain's first record not older
        than ``cutoff``, leaving an anchor, in transactions of at most ``PRUNE_CHUNK`` records."""
        result = PruneResult()
        try:
            with self.read() as cur:
                cur.execute(self.sql("SELECT DISTINCT writer FROM audit_records WHERE time < ?"), (cutoff,))
                writers = sorted(w for (w,) in cur.fetchall())
            for writer in writers:
                removed = self._prune_chain(writer, cutoff, dry_run, result.records, progress)
                if removed:
                    result.records += removed
                    result.writers += 1
        except StoreError:
            raise
        except Exception as exc:
            raise self.wrap(exc) from None
        return result

    def _prune_chain(self, writer: str, cutoff: str, dry_run: bool, done: int,
                     progress: Optional[Callable[[int], None]]) -> int:
        removed = 0
        while True:
            with (self.read() if dry_run else self.write()) as cur:
                self.lock_writer(cur, writer)
                cur.execute(self.sql("SELECT MIN(seq), MAX(seq) FROM audit_records WHERE writer = ?"), (writer,))
                first, last = cur.fetchone()
                if first is None:
                    return removed
                cur.execute(self.sql("SELECT seq FROM audit_records WHERE writer = ? AND time >= ? "
                                     "ORDER BY seq LIMIT 1"), (writer, cutoff))
                row = cur.fetchone()
                keep_from = int(row[0]) if row is not None else int(last) + 1
                if keep_from <= first:
                    return removed
                if dry_run:
                    cur.execute(self.sql("SELECT COUNT(*) FROM audit_records WHERE writer = ? AND seq < ?"),
                                (writer, keep_from))
                    return int(cur.fetchone()[0])
                upto = min(keep_from, int(first) + PRUNE_CHUNK)
                cur.execute(self.sql("SELECT hash FROM audit_records WHERE writer = ? AND seq = ?"), (writer, upto - 1))
                prev = cur.fetchone()
                if prev is None:  # a gap: the chain is already broken; leave it for verify to report
                    raise StoreError(f"audit sink {self.name}: writer {writer} has no record at seq {upto - 1}; "
                                     "run verify, prune stopped")
                cur.execute(self.sql("DELETE FROM audit_records WHERE writer = ? AND seq < ?"), (writer, upto))
                count = cur.rowcount
                cur.execute(self.sql(
                    "INSERT INTO audit_anchors (writer, seq, prev_hash, cutoff, pruned_at, pruned) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (writer) DO UPDATE SET seq = excluded.seq, "
                    "prev_hash = excluded.prev_hash, cutoff = excluded.cutoff, pruned_at = excluded.pruned_at, "
                    "pruned = audit_anchors.pruned + excluded.pruned"),
                    (writer, upto, prev[0], cutoff, format_time(utc_now()), count))
            removed += count
            if progress is not None:
                progress(done + removed)


def open_store(url: str, timeout_ms: int = 5000, synchronous: str = "full", create: bool = True) -> SqlStore:
    """The store behind a sink URL, its schema in place. ``create=False`` (the command
    line) creates nothing: no SQLite file, no tables; a sink without a trail is a ``StoreError``."""
    kind = sink_kind(url)
    if kind == "sqlite":
        from .sqlite import SqliteStore

        store: SqlStore = SqliteStore(url, sqlite_path(url), timeout_ms, synchronous, create)
    else:
        from .postgres import PostgresStore

        store = PostgresStore(url, timeout_ms)
    try:
        if create:
            store.ensure_schema()
        else:
            version = store.schema_version()
            if version != SCHEMA_VERSION:
                raise StoreError(f"audit sink {store.name}: " + ("no audit trail there (no audit tables; "
                                 "tsexplain-audit init creates them)" if version is None else
                                 f"schema version {version}, this code knows {SCHEMA_VERSION}"))
    except BaseException:
        store.close()
        raise
    return store
