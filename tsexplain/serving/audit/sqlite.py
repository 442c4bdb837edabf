"""The embedded sink: one SQLite file in WAL mode.

- Created owner-only: the file is made with mode 0600 (its folder, when missing,
  0700) before SQLite opens it; SQLite gives its ``-wal`` and ``-shm`` files the
  database file's permissions.
- Several workers of one TorchServe write to it at once: each write is a
  ``BEGIN IMMEDIATE`` transaction, which takes the file's write lock at once, and a
  writer waits up to ``timeout_ms`` (SQLite's busy timeout) for another's commit.
  Readers (``tsexplain-audit``) never block writers in WAL mode.
- ``synchronous=FULL`` (default): a commit returns after the WAL is synced to disk,
  so a record whose ``record()`` returned survives a killed worker and a power cut.
  ``NORMAL`` syncs only at checkpoints: a killed process loses nothing committed,
  a power cut may lose the last commits (docs/audit.md has the measured cost).
"""
from __future__ import annotations

import contextlib
import os
import sqlite3
import time

from .store import SqlStore, StoreError


class SqliteStore(SqlStore):
    blob_type = "BLOB"
    int_type = "INTEGER"

    def __init__(self, url: str, path: str, timeout_ms: int, synchronous: str = "full", create: bool = True):
        super().__init__(url, timeout_ms)
        self.path = path
        if not os.path.exists(path):
            if not create:
                raise StoreError(f"audit sink {self.name}: no trail there (no such file)")
            self._create_owner_only(path)
        try:
            self.connection = sqlite3.connect(path, timeout=timeout_ms / 1000, isolation_level=None,
                                              check_same_thread=False)
            self.connection.execute(f"PRAGMA busy_timeout = {int(timeout_ms)}")
            mode = self._switch_to_wal(timeout_ms)
            if str(mode).lower() != "wal":
                raise StoreError(f"audit sink {self.name}: could not switch to WAL mode (got {mode})")
            self.connection.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        except sqlite3.Error as exc:
            raise self.wrap(exc) from None

    def _switch_to_wal(self, timeout_ms: int) -> str:
        """``PRAGMA journal_mode = WAL``, retried until ``timeout_ms``: on a new file the
        switch needs the file's exclusive lock, and SQLite answers "database is locked"
        at once, without its busy handler, while another worker opens the same file
        (measured without the retry: 2 of 15 starts of 4 worker processes on one new file
        failed, and 20 of 200 rounds of 6 threads)."""
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            try:
                return self.connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            except sqlite3.OperationalError as exc:
                busy = "locked" in str(exc) or "busy" in str(exc)
                if not busy or time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)

    def _create_owner_only(self, path: str) -> None:
        folder = os.path.dirname(path)
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                pass  # another worker created it first
        except OSError as exc:
            raise StoreError(f"audit sink {self.name}: cannot create the file ({exc.strerror})") from None

    @contextlib.contextmanager
    def write(self):
        cur = self.connection.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                cur.execute("ROLLBACK")
            raise
        try:
            cur.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                cur.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def read(self):
        cur = self.connection.cursor()
        cur.execute("BEGIN")
        try:
            yield cur
        finally:
            with contextlib.suppress(sqlite3.Error):
                cur.execute("ROLLBACK")

    def close(self) -> None:
        connection = getattr(self, "connection", None)
        if connection is not None:
            with contextlib.suppress(sqlite3.Error):
                connection.close()
            self.connection = None
