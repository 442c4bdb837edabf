"""Reading one settings section: the YAML mapping, then environment overrides, validated.

Light on purpose (PyYAML only), so the command-line tools can read settings without
importing torch. ``load_section`` applies ``TSEXPLAIN_<MODEL>_<KEY>`` then
``TSEXPLAIN_<KEY>`` (values parsed as YAML: ``true``, ``5``, ``[64, 64]``) and builds
the section's frozen dataclass, whose ``__post_init__`` validates it. Unknown keys
and bad values raise ``ConfigError``, so a model with nonsense settings fails to load
(and to build) instead of serving wrong answers.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")
ENV_PREFIX = "TSEXPLAIN"


def env_names(model_name: str, key: str, prefix: str = "") -> list[str]:
    """Environment variables that override ``key``, most specific first; ``prefix``
    names a nested section (``audit``: ``TSEXPLAIN_<MODEL>_AUDIT_<KEY>``)."""
    model = re.sub(r"[^A-Za-z0-9]", "_", model_name).upper()
    name = f"{prefix.upper()}_{key.upper()}" if prefix else key.upper()
    return [f"{ENV_PREFIX}_{model}_{name}", f"{ENV_PREFIX}_{name}"]


def load_section(cls: type[T], section: Optional[Mapping[str, Any]], model_name: str, environ: Mapping[str, str],
                 prefix: str = "") -> T:
    """Build settings ``cls`` (a dataclass with a ``section`` name) from a YAML mapping and
    environment overrides (``env_names`` with ``prefix``)."""
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise ConfigError(f"{cls.section}: expected a mapping, got {type(section).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(section) - set(names))
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown} in {cls.section!r}; known: {names}")
    values = dict(section)
    for name in names:
        for variable in env_names(model_name, name, prefix):
            if variable in environ:
                try:
                    values[name] = yaml.safe_load(environ[variable])
                except yaml.YAMLError as exc:
                    raise ConfigError(f"{variable}: not a valid value ({exc.problem})") from None
                break
    return cls(**values)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def is_number(value: Any, low: float, high: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


def is_size(value: Any) -> bool:
    """A positive int, or a pair of them ([h, w])."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value > 0
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))
