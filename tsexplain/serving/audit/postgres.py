"""The sink for several replicas: a PostgreSQL database, through psycopg 3.

Every worker of every TorchServe instance is its own writer with its own chain, so
writers never contend for a row: records of different writers are plain inserts.
Schema creation takes a transaction-level advisory lock, so instances starting
together do not race on ``CREATE TABLE IF NOT EXISTS``; prunes of one chain take
one per chain. Reads for ``verify`` run in one ``REPEATABLE READ`` snapshot, through
a server-side cursor. A connection that failed is dropped and opened again at the
next call. The URL is libpq's (``postgresql://user@host:5432/db``); keep the
password in ``PGPASSWORD`` or a ``PGPASSFILE``, not in the model config.
"""
from __future__ import annotations

import contextlib
import itertools

from .store import SqlStore, StoreError

try:
    import psycopg
except ImportError:  # an optional dependency: only a PostgreSQL sink needs it
    psycopg = None

SCHEMA_LOCK = 0x7473_6578_6175_6474 & 0x7FFF_FFFF_FFFF_FFFF  # "tsexaudt"
_cursor_names = itertools.count()


class PostgresStore(SqlStore):
    blob_type = "BYTEA"
    int_type = "BIGINT"

    def __init__(self, url: str, timeout_ms: int):
        super().__init__(url, timeout_ms)
        if psycopg is None:
            raise StoreError("a postgresql:// audit sink needs psycopg: pip install 'psycopg[binary]'")
        self.connection = None
        self._connect()

    def _connect(self):
        if self.connection is not None and not self.connection.closed and not self.connection.broken:
            return self.connection
        self.close()
        timeout = int(self.timeout_ms)
        try:
            self.connection = psycopg.connect(
                self.url, autocommit=True, connect_timeout=max(1, -(-timeout // 1000)),
                options=f"-c statement_timeout={timeout} -c lock_timeout={timeout} "
                        f"-c idle_in_transaction_session_timeout={max(timeout, 60_000)}",
                application_name="tsexplain-audit")
        except psycopg.Error as exc:
            raise self.wrap(exc) from None
        return self.connection

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    @contextlib.contextmanager
    def write(self):
        connection = self._connect()
        with connection.transaction():
            with connection.cursor() as cur:
                yield cur

    @contextlib.contextmanager
    def read(self):
        connection = self._connect()
        with connection.transaction():
            with connection.cursor() as cur:
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                yield cur

    def stream(self, cur, text, params=()):
        with cur.connection.cursor(name=f"tsexplain_audit_{next(_cursor_names)}") as named:
            named.itersize = 500
            named.execute(self.sql(text), params)
            yield from named

    def lock_schema(self, cur) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))

    def lock_writer(self, cur, writer: str) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", ("tsexplain-audit-prune:" + writer,))

    def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):
                self.connection.close()
            self.connection = None
