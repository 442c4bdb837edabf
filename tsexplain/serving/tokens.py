"""Named explain tokens: which caller presented the ``X-Explain-Token``.

Config (the ``explain:`` section)::

    explain:
      tokens:                      # several named tokens, e.g. one per auditing team
        team-a: {env: TEAM_A_EXPLAIN_TOKEN}
        team-b: {file: /run/secrets/team-b-token}
      token_env: EXPLAIN_TOKEN     # the single token of before still works: its name is "default"

``parse_token_specs`` validates the ``tokens`` mapping at load (no secret is read);
``ExplainTokens.load`` reads the secrets at initialize; ``ExplainTokens.match``
returns the name of the token a request presented, or ``None``. The audit record
keeps that name as its ``caller``, never the token.

Matching compares the SHA-256 of the presented value with each token's SHA-256
with ``hmac.compare_digest``, against every token, without stopping at a match:
the time taken does not depend on which token matched, nor on the secrets'
lengths or contents.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from tsexplain.serving.errors import ConfigError

DEFAULT_NAME = "default"  # the label of explain.token_env / token_file
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class TokenSpec:
    """Where one named token is read from: an environment variable or a file."""

    name: str
    env: Optional[str] = None
    file: Optional[str] = None


def parse_token_specs(tokens: Any) -> tuple[TokenSpec, ...]:
    """Validate ``explain.tokens`` (``None``: no named tokens); ``ConfigError`` naming the key."""
    if tokens is None:
        return ()
    if not isinstance(tokens, Mapping) or not tokens:
        raise ConfigError("explain.tokens must be a mapping of names to {env: VARIABLE} or {file: path}")
    specs = []
    for name, source in tokens.items():
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise ConfigError(f"explain.tokens: {name!r} is not a valid token name "
                              "(letters, digits, '.', '_', '-'; at most 64)")
        if name == DEFAULT_NAME:
            raise ConfigError(f"explain.tokens: {DEFAULT_NAME!r} is reserved for explain.token_env/token_file")
        key = f"explain.tokens.{name}"
        if not isinstance(source, Mapping) or set(source) - {"env", "file"} or len(source) != 1:
            raise ConfigError(f"{key} must be {{env: VARIABLE}} or {{file: path}} (exactly one)")
        ((kind, value),) = source.items()
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{key}.{kind} must be a non-empty string")
        specs.append(TokenSpec(name, **{kind: value}))
    return tuple(specs)


def _read(spec: TokenSpec, environ: Mapping[str, str], key: str) -> bytes:
    if spec.env is not None:
        value = environ.get(spec.env)
        if value is None or not value.strip():
            raise ConfigError(f"{key} names {spec.env}, which is not set or empty")
        return value.strip().encode()
    try:
        value = Path(os.path.expanduser(spec.file)).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{key} {spec.file}: cannot read it ({exc.strerror})") from None
    if not value:
        raise ConfigError(f"{key} {spec.file} is empty")
    return value.encode()


class ExplainTokens:
    """The tokens explanations accept, by name (empty: no token required)."""

    def __init__(self, secrets: Mapping[str, bytes]):
        self._digests = [(name, hashlib.sha256(secret).digest()) for name, secret in secrets.items()]

    @classmethod
    def load(cls, specs: tuple[TokenSpec, ...], token_env: Optional[str], token_file: Optional[str],
             environ: Mapping[str, str]) -> "ExplainTokens":
        """Read every secret (at initialize). Two names with the same secret are a ``ConfigError``:
        the record could not tell the callers apart."""
        secrets: dict[str, bytes] = {}
        if token_env or token_file:
            key = "explain.token_env" if token_env else "explain.token_file"
            secrets[DEFAULT_NAME] = _read(TokenSpec(DEFAULT_NAME, token_env, None if token_env else token_file),
                                          environ, key)
        for spec in specs:
            kind = "env" if spec.env is not None else "file"
            secrets[spec.name] = _read(spec, environ, f"explain.tokens.{spec.name}.{kind}")
        by_secret: dict[bytes, str] = {}
        for name, secret in secrets.items():
            if secret in by_secret:
                raise ConfigError(f"explain.tokens: {by_secret[secret]!r} and {name!r} have the same secret")
            by_secret[secret] = name
        return cls(secrets)

    @property
    def required(self) -> bool:
        return bool(self._digests)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._digests]

    def match(self, presented: Optional[str | bytes]) -> Optional[str]:
        """The name of the token ``presented`` equals, or ``None``."""
        if isinstance(presented, str):
            presented = presented.encode()
        digest = hashlib.sha256(presented or b"").digest()
        found = None
        for name, expected in self._digests:  # every token, no early exit
            if hmac.compare_digest(digest, expected) and presented:
                found = name
        return found
