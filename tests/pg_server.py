"""A throw-away PostgreSQL server for the tests: Debian's ``postgresql`` in a temporary
cluster on a free loopback port, stopped and removed afterwards.

``TemporaryPostgres.start()`` finds ``initdb``/``pg_ctl`` (``/usr/lib/postgresql/<v>/bin``
or ``PATH``), installs Debian's ``postgresql`` with ``apt-get`` when they are missing and
this runs as root, and raises ``PostgresUnavailable`` (the tests skip with its message)
only when that cannot be done. PostgreSQL refuses to run as root: as root the cluster
belongs to the ``postgres`` user that the Debian package creates, and the commands
run through ``runuser``. Used by the ``postgres_url`` fixture in ``conftest.py``.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Optional


class PostgresUnavailable(Exception):
    pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_bin() -> Optional[Path]:
    """The folder holding initdb and pg_ctl (the newest Debian version first)."""
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if versions:
        return Path(versions[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb and shutil.which("pg_ctl") else None


def install() -> Path:
    """Install Debian's postgresql (as root), or say why not."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise PostgresUnavailable("PostgreSQL is not installed, and installing it needs root and apt-get "
                                  "(apt-get install postgresql)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "postgresql"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise PostgresUnavailable(f"installing Debian's postgresql failed: {' '.join(command)}: "
                                      f"{done.stderr.strip()[-300:]}")
    found = find_bin()
    if found is None:
        raise PostgresUnavailable("postgresql was installed but initdb/pg_ctl are not found")
    return found


class TemporaryPostgres:
    """One cluster in a temporary folder; ``url`` is its ``postgres`` database."""

    def __init__(self):
        self.root: Optional[Path] = None
        self.port = 0
        self.bin: Optional[Path] = None
        self.user: Optional[str] = None  # the OS user the server runs as (None: this one)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise PostgresUnavailable(f"{args[0]} failed: {(done.stderr or done.stdout).strip()[-500:]}")
        return done

    def start(self) -> "TemporaryPostgres":
        self.bin = find_bin() or install()
        if os.geteuid() == 0:
            try:
                import pwd

                pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root and there is no 'postgres' user to run the server as")
            if not shutil.which("runuser"):
                raise PostgresUnavailable("running as root without runuser to drop to the 'postgres' user")
            self.user = "postgres"
        self.root = Path(tempfile.mkdtemp(prefix="tsexplain-pg-"))
        if self.user:
            shutil.chown(self.root, self.user)
        data = self.root / "data"
        self._run("initdb", "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
        self.port = _free_port()
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c max_connections=100")
        try:
            self._run("pg_ctl", "-D", str(data), "-o", options, "-l", str(self.root / "server.log"), "-w",
                      "-t", "60", "start")
        except PostgresUnavailable:
            log = (self.root / "server.log")
            detail = log.read_text()[-500:] if log.exists() else ""
            self.stop()
            raise PostgresUnavailable(f"the temporary PostgreSQL did not start: {detail}")
        return self

    def create_database(self, name: str) -> str:
        """A new empty database; its URL."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.root is None:
            return
        data = self.root / "data"
        if (data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None
