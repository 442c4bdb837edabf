"""``explain.audit``: which explanations are recorded, where, and what happens on failure.

Read once at initialize from the ``audit:`` mapping inside the model config's
``explain:`` section, then overridden by environment variables of the TorchServe
process, as every other setting: ``TSEXPLAIN_<MODEL>_AUDIT_<KEY>`` for one model,
then ``TSEXPLAIN_AUDIT_<KEY>`` for all (values parsed as YAML). Unknown keys and
bad values raise ``ConfigError`` naming the key, so a model whose trail is
misconfigured fails to load instead of answering explanations nobody recorded.

No TorchServe import, and no torch: the ``tsexplain-audit`` command line uses it too.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional
from urllib.parse import urlsplit, urlunsplit


from ..config import check as _check, env_names as _env_names, is_int as _is_int, load_section
from ..errors import ConfigError

RECORD_MODES = ("none", "all", "priority")
ON_FAILURE = ("fail", "serve")
SQLITE_SYNCHRONOUS = ("full", "normal")
SQLITE_SCHEME = "sqlite"
POSTGRES_SCHEMES = ("postgresql", "postgres")
DEFAULT_MAX_INPUT_BYTES = 1 << 20


def env_names(model_name: str, key: str) -> list[str]:
    """Environment variables that override ``explain.audit.<key>``, most specific first."""
    return _env_names(model_name, key, "audit")


def sqlite_path(url: str) -> str:
    """The absolute file path of a ``sqlite:///abs/path.db`` sink (``sqlite:////abs/path.db``,
    SQLAlchemy's spelling, works too)."""
    path = url[len(SQLITE_SCHEME) + 3:] if url.startswith(f"{SQLITE_SCHEME}://") else ""
    path = "/" + path.lstrip("/") if path.startswith("/") else path
    if not path or not os.path.isabs(path) or path.endswith("/"):
        raise ConfigError(
            "explain.audit.sink: a SQLite sink is sqlite:/// followed by an absolute file path "
            "(sqlite:///var/lib/tsexplain/audit.db); a relative path would land in the worker's "
            "temporary model folder and be lost")
    return os.path.normpath(path)


def sink_kind(url: str) -> str:
    """``"sqlite"`` or ``"postgresql"``; ``ConfigError`` for anything else."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == SQLITE_SCHEME:
        sqlite_path(url)
        return "sqlite"
    if scheme in POSTGRES_SCHEMES:
        return "postgresql"
    raise ConfigError("explain.audit.sink must be a sqlite:///absolute/path.db or postgresql://... URL")


def redact(url: str) -> str:
    """The sink URL without its password, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable sink URL>"
    query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
    if parts.password is None and query == parts.query:
        return url
    if parts.password is not None:
        user, host = parts.netloc.rsplit("@", 1)
        parts = parts._replace(netloc=f"{user.split(':', 1)[0]}:***@{host}")
    return urlunsplit(parts._replace(query=query))


@dataclass(frozen=True)
class AuditSettings:
    """The ``explain.audit:`` keys (see docs/audit.md for the reference table).

    ``record``: ``none`` (default: no trail), ``all`` (every explanation served) or
    ``priority`` (explanations whose priority value, header or JSON field, is one of
    ``priority_values``, compared case-insensitively).
    ``sink``: ``sqlite:///absolute/path.db`` or ``postgresql://user@host:port/db``
    (keep the password out of the URL: libpq reads ``PGPASSWORD`` or ``PGPASSFILE``).
    ``keep_input``: keep the input bytes (up to ``max_input_bytes``; larger inputs keep
    their SHA-256, size and content type only, flagged); off: never the bytes.
    ``retention_days``: records older than this are pruned when a worker opens the trail
    (``null``: kept until ``tsexplain-audit prune``).
    ``on_failure``: ``fail`` (the explanation whose record could not be committed gets
    503 ``audit_unavailable``) or ``serve`` (it is answered without an
    ``explanation_id``; the lost record is counted and logged).
    ``timeout_ms``: how long a write may wait for the sink (SQLite's busy timeout,
    PostgreSQL's connect and statement timeouts).
    ``sqlite_synchronous``: ``full`` (a committed record survives a power cut) or
    ``normal`` (it survives a killed process, not a power cut; cheaper), see docs/audit.md.
    """

    section = "explain.audit"
    record: str = "none"
    priority_values: list = field(default_factory=lambda: ["audit"])
    sink: Optional[str] = None
    keep_input: bool = False
    max_input_bytes: int = DEFAULT_MAX_INPUT_BYTES
    retention_days: Optional[int] = None
    on_failure: str = "fail"
    timeout_ms: int = 5000
    sqlite_synchronous: str = "full"

    def __post_init__(self):
        if self.record is False:  # YAML 1.1 reads an unquoted `off` / `no` as false
            object.__setattr__(self, "record", "none")
        _check(self.record in RECORD_MODES, f"explain.audit.record must be one of {list(RECORD_MODES)}")
        _check(isinstance(self.priority_values, (list, tuple)) and self.priority_values
               and all(isinstance(v, str) and v.strip() for v in self.priority_values),
               "explain.audit.priority_values must be a non-empty list of strings")
        _check(self.sink is None or (isinstance(self.sink, str) and self.sink.strip()),
               "explain.audit.sink must be a URL string")
        if self.sink is not None:
            sink_kind(self.sink)
        _check(self.record == "none" or self.sink is not None,
               "explain.audit.sink must be set when explain.audit.record is not none "
               "(e.g. sqlite:///var/lib/tsexplain/audit.db)")
        _check(isinstance(self.keep_input, bool), "explain.audit.keep_input must be true or false")
        _check(_is_int(self.max_input_bytes, 1, 1 << 30), "explain.audit.max_input_bytes must be an int in [1, 1073741824]")
        _check(self.retention_days is None or _is_int(self.retention_days, 1, 36500),
               "explain.audit.retention_days must be an int in [1, 36500] (days) or null")
        _check(self.on_failure in ON_FAILURE, f"explain.audit.on_failure must be one of {list(ON_FAILURE)}")
        _check(_is_int(self.timeout_ms, 1, 600_000), "explain.audit.timeout_ms must be an int in [1, 600000] (milliseconds)")
        _check(self.sqlite_synchronous in SQLITE_SYNCHRONOUS,
               f"explain.audit.sqlite_synchronous must be one of {list(SQLITE_SYNCHRONOUS)}")

    @property
    def enabled(self) -> bool:
        return self.record != "none"

    def selects(self, priority: Optional[str]) -> bool:
        """Whether an explanation served with this priority value is recorded."""
        if self.record == "all":
            return True
        if self.record == "priority" and isinstance(priority, str):
            return priority.strip().lower() in {v.strip().lower() for v in self.priority_values}
        return False

    @classmethod
    def load(cls, section: Optional[Mapping[str, Any]], model_name: str, environ: Mapping[str, str]) -> "AuditSettings":
        """From the ``explain.audit`` mapping of the model config and environment overrides."""
        return load_section(cls, section, model_name, environ, prefix="audit")
