"""What one audit record holds, and its canonical JSON text.

The batch flow describes each explanation it is about to answer with an
``AuditEntry``; the trail turns it into a record body (a JSON object) and stores
the body's canonical text, which is what the chain hashes. The body never holds
a token, only the name of the token that matched (``caller``).

Canonical JSON: ``json.dumps(sort_keys=True, separators=(",", ":"),
ensure_ascii=False, allow_nan=False)``, UTF-8. Non-finite floats (a NaN delta)
are written as the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``; tuples
become lists; anything that is not JSON data is a ``TypeError``, raised before
the sink is touched.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

RECORD_VERSION = 1
# Renderings of the explanation that the record does not keep: the overlay is
# drawn again from the kept input and the heatmap (tsexplain-audit show --overlay),
# the HTML from the word attributions.
RENDERINGS = ("overlay_png", "html")


@dataclass(frozen=True)
class ModelIdentity:
    """The model that answered: its name, version and the SHA-256 of the MAR's files
    (``tsexplain.serving.cache.fingerprint_files`` of the extracted MAR)."""

    name: str
    version: Optional[str]
    mar_sha256: Optional[str]


@dataclass(frozen=True)
class AuditEntry:
    """One explanation about to be answered, as the batch flow saw it.

    ``route``: where it came in (``explanations``, ``kserve_v1``, ``kserve_v2``, ``legacy``).
    ``method``: the explanation method used. ``target``, ``contrast``: ``{"index", "label"}``
    as answered (``None``: no contrast). ``parameters``: the effective parameters (for
    images ``n_steps``, ``layer``, ``baseline``, ``heatmap_size``, ``outputs``, and the
    preprocessing ``resize``/``crop`` and ``overlay_alpha`` that ``show --overlay`` needs;
    for text ``n_steps``, ``layer``, ``baseline``, ``precision``, ``integration``).
    ``predictions``: the top-k list as answered. ``explanation``: the answered explanation
    object (heatmap values, or tokens and words); ``overlay_png`` and ``html`` are dropped.
    ``status``: the HTTP status the explanation is answered with. ``elapsed_ms``: its time.
    ``input_bytes``: the request's input (image bytes, or the text as UTF-8); the trail
    keeps its SHA-256 and size, and the bytes only when ``keep_input`` allows.
    ``convergence_delta``/``converged``: ``None`` takes them from ``explanation``.
    ``priority``: the priority value the request carried. ``caller``: the name of the
    explain token that matched (never the token). ``request_id``: TorchServe's id.
    """

    route: str
    method: str
    target: Optional[Mapping[str, Any]]
    parameters: Mapping[str, Any]
    predictions: Sequence[Mapping[str, Any]]
    explanation: Mapping[str, Any]
    input_bytes: bytes
    content_type: str
    status: int = 200
    elapsed_ms: Optional[float] = None
    contrast: Optional[Mapping[str, Any]] = None
    convergence_delta: Optional[Any] = None
    converged: Optional[bool] = None
    priority: Optional[str] = None
    caller: Optional[str] = None
    request_id: Optional[str] = None


def plain(value: Any, where: str = "record") -> Any:
    """``value`` as JSON data: non-finite floats as strings, tuples as lists."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: keys must be strings, got {type(key).__name__}")
            out[key] = plain(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [plain(item, where) for item in value]
    raise TypeError(f"{where}: {type(value).__name__} is not JSON data")


def canonical_json(value: Any) -> str:
    """The canonical text of JSON data (see the module docstring)."""
    try:  # the common case, at C speed
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError):  # a non-finite float, or something that is not JSON data: say where
        return json.dumps(plain(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def input_description(data: bytes, content_type: str, keep: bool, max_bytes: int) -> tuple[dict, Optional[bytes]]:
    """The record's ``input`` object and the bytes to keep (``None``: not kept)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"input_bytes must be bytes, got {type(data).__name__}")
    data = bytes(data)
    described = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data),
                 "content_type": content_type or None, "kept": False}
    if keep and len(data) <= max_bytes:
        described["kept"] = True
        return described, data
    if keep:
        described["over_cap"] = True  # keep_input is on, but the input is larger than max_input_bytes
    return described, None


def record_body(entry: AuditEntry, *, record_id: str, writer: str, seq: int, time: str, model: ModelIdentity,
                input_object: Mapping[str, Any]) -> dict:
    """The JSON object stored (and hashed) for ``entry``."""
    _require(isinstance(entry.route, str) and entry.route, "route must be a non-empty string")
    _require(isinstance(entry.method, str) and entry.method, "method must be a non-empty string")
    _require(isinstance(entry.status, int) and not isinstance(entry.status, bool), "status must be an int")
    _require(isinstance(entry.explanation, Mapping), "explanation must be a mapping")
    explanation = {k: v for k, v in entry.explanation.items() if k not in RENDERINGS}
    delta = entry.convergence_delta if entry.convergence_delta is not None else explanation.get("convergence_delta")
    converged = entry.converged if entry.converged is not None else explanation.get("converged")
    body = {
        "v": RECORD_VERSION,
        "id": record_id,
        "writer": writer,
        "seq": seq,
        "time": time,
        "model": {"name": model.name, "version": model.version, "mar_sha256": model.mar_sha256},
        "input": dict(input_object),
        "route": entry.route,
        "method": entry.method,
        "target": entry.target,
        "contrast": entry.contrast,
        "parameters": dict(entry.parameters or {}),
        "predictions": list(entry.predictions or []),
        "explanation": explanation,
        "convergence_delta": delta,
        "converged": converged,
        "status": entry.status,
        "elapsed_ms": entry.elapsed_ms,
        "priority": entry.priority,
        "caller": entry.caller,
        "request_id": entry.request_id,
    }
    return body


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"AuditEntry: {message}")


# The columns stored beside the body for finding records, and where each lies in the
# body: verify checks that they agree, so editing a column to hide a record shows.
INDEXED_COLUMNS = {
    "id": ("id",),
    "writer": ("writer",),
    "seq": ("seq",),
    "time": ("time",),
    "model": ("model", "name"),
    "method": ("method",),
    "caller": ("caller",),
    "input_sha256": ("input", "sha256"),
}


def body_field(body: Mapping[str, Any], path: Sequence[str]) -> Any:
    value: Any = body
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value
