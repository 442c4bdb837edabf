"""Turning one request body into validated fields, or a ``RequestError``.

A body is raw bytes (an image, or UTF-8 text) or a JSON object with ``data`` and
options. TorchServe hands the body over already decoded when the client sent
``Content-Type: application/json`` (a dict or list), as text for ``text/*``,
and as bytes otherwise; undecodable JSON arrives as bytes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

from .errors import RequestError
from .images import decode_base64
from .settings import HEATMAP_SIZES, IMAGE_OUTPUTS

Target = Union[int, str, None]  # index, label, or None for the predicted class
IMAGE_FIELDS = {"data", "target", "contrast", "method", "n_steps", "outputs", "heatmap_size", "top_k", "priority",
                "deadline_ms"}
MAX_N_STEPS = 10_000  # the hard bound; each model's explain.max_n_steps is checked by its handler
TEXT_FIELDS = {"data", "target", "contrast", "method", "n_steps", "top_k", "html", "priority", "deadline_ms"}
MAX_DEADLINE_MS = 3_600_000  # the model's explain.deadline_ms bounds it further


@dataclass(frozen=True)
class ImageRequest:
    image: bytes
    target: Target = None
    method: Optional[str] = None
    outputs: Optional[tuple[str, ...]] = None
    contrast: Target = None  # a class to explain against: "why target rather than contrast"
    n_steps: Optional[int] = None
    heatmap_size: Optional[str] = None
    top_k: Optional[int] = None
    priority: Optional[str] = None
    deadline_ms: Optional[int] = None


def request_body(row: Mapping[str, Any]) -> Any:
    """The body of one TorchServe request row (``data`` or ``body`` field)."""
    for key in ("data", "body"):
        if key in row and row[key] is not None:
            return row[key]
    if len(row) == 1 and next(iter(row.values())) is not None:  # a form part under another name
        return next(iter(row.values()))
    raise RequestError(
        "the request has no body; send it raw (Content-Type application/octet-stream for images, "
        "text/plain for text) or as application/json with a 'data' field", "empty_body")


def _json_object(body: Any) -> Optional[dict]:
    """The JSON object in ``body``, ``None`` if the body is not JSON at all."""
    if isinstance(body, dict):
        return body
    if isinstance(body, list):
        raise RequestError("expected a JSON object, got a JSON array", "bad_json")
    if isinstance(body, (bytes, bytearray)):
        head = bytes(body[:64]).lstrip()
        if not head.startswith(b"{"):
            return None
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("the JSON body is not valid UTF-8", "bad_json") from None
    if isinstance(body, str) and body.lstrip().startswith("{"):
        try:
            value = json.loads(body)
        except json.JSONDecodeError as exc:
            raise RequestError(f"invalid JSON: {exc.msg} at position {exc.pos}", "bad_json") from None
        if not isinstance(value, dict):
            raise RequestError("expected a JSON object", "bad_json")
        return value
    return None


def parse_target(value: Any, field: str = "target") -> Target:
    """``"predicted"``/``None`` → None; an int index; or a label string."""
    if value is None or (value == "predicted" and field == "target"):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        choices = 'a class index, a label or "predicted"' if field == "target" else "a class index or a label"
        raise RequestError(f"'{field}' must be {choices}", f"bad_{field}")
    if isinstance(value, str) and not value.strip():
        raise RequestError(f"'{field}' is an empty string", f"bad_{field}")
    return value


def _optional_str(options: Mapping[str, Any], key: str) -> Optional[str]:
    value = options.get(key)
    if value is not None and not isinstance(value, str):
        raise RequestError(f"'{key}' must be a string", f"bad_{key}")
    return value


def _optional_int(options: Mapping[str, Any], key: str, low: int, high: int) -> Optional[int]:
    value = options.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"'{key}' must be an integer in [{low}, {high}]", f"bad_{key}")
    return value


def parse_image_request(row: Mapping[str, Any]) -> ImageRequest:
    """Validate one image request row. Decoding the image itself happens later."""
    body = request_body(row)
    options = _json_object(body)
    if options is None:
        if isinstance(body, str):
            return ImageRequest(image=decode_base64(body))
        if not isinstance(body, (bytes, bytearray)):
            raise RequestError("expected image bytes or a JSON object with 'data'", "bad_json")
        return ImageRequest(image=bytes(body))
    unknown = sorted(set(options) - IMAGE_FIELDS)
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; known: {sorted(IMAGE_FIELDS)}", "unknown_field")
    data = options.get("data")
    if not isinstance(data, str):
        raise RequestError("'data' must be a base64-encoded image string", "bad_data")
    outputs = options.get("outputs")
    if outputs is not None:
        if isinstance(outputs, str):
            outputs = [outputs]
        if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
            raise RequestError("'outputs' must be a list of strings", "bad_outputs")
        unknown_outputs = sorted(set(outputs) - set(IMAGE_OUTPUTS))
        if unknown_outputs:
            raise RequestError(f"unknown output(s) {unknown_outputs}; known: {list(IMAGE_OUTPUTS)}", "bad_outputs")
        outputs = tuple(dict.fromkeys(outputs))
    heatmap_size = _optional_str(options, "heatmap_size")
    if heatmap_size is not None and heatmap_size not in HEATMAP_SIZES:
        raise RequestError(f"'heatmap_size' must be one of {list(HEATMAP_SIZES)}", "bad_heatmap_size")
    return ImageRequest(
        image=decode_base64(data),
        target=parse_target(options.get("target")),
        method=_optional_str(options, "method"),
        outputs=outputs,
        contrast=parse_target(options.get("contrast"), "contrast"),
        n_steps=_optional_int(options, "n_steps", 1, MAX_N_STEPS),
        heatmap_size=heatmap_size,
        top_k=_optional_int(options, "top_k", 1, 1000),
        priority=_optional_str(options, "priority"),
        deadline_ms=_optional_int(options, "deadline_ms", 1, MAX_DEADLINE_MS),
    )


@dataclass(frozen=True)
class TextRequest:
    text: str
    target: Target = None
    method: Optional[str] = None
    contrast: Target = None  # explain target rather than this class
    n_steps: Optional[int] = None
    top_k: Optional[int] = None
    html: Optional[bool] = None
    priority: Optional[str] = None
    deadline_ms: Optional[int] = None


def _text(value: Any, max_chars: int) -> str:
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"the text is not valid UTF-8 (byte {exc.start})", "bad_encoding") from None
    if not isinstance(value, str):
        raise RequestError("'data' must be a string of text", "bad_data")
    if not value.strip():
        raise RequestError("the text is empty or only whitespace", "empty_text")
    if len(value) > max_chars:
        raise RequestError(f"the text has {len(value)} characters, over the limit of {max_chars}", "text_too_long", 413)
    return value


def parse_text_request(row: Mapping[str, Any], max_chars: int, max_n_steps: int) -> TextRequest:
    """Validate one text request row: raw UTF-8 text, or a JSON object."""
    body = request_body(row)
    options = _json_object(body)
    if options is None:
        if isinstance(body, (dict, list)) or not isinstance(body, (bytes, bytearray, str)):
            raise RequestError("expected text or a JSON object with 'data'", "bad_json")
        return TextRequest(text=_text(body, max_chars))
    unknown = sorted(set(options) - TEXT_FIELDS)
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; known: {sorted(TEXT_FIELDS)}", "unknown_field")
    html = options.get("html")
    if html is not None and not isinstance(html, bool):
        raise RequestError("'html' must be true or false", "bad_html")
    return TextRequest(
        text=_text(options.get("data"), max_chars),
        target=parse_target(options.get("target")),
        method=_optional_str(options, "method"),
        contrast=parse_target(options.get("contrast"), "contrast"),
        n_steps=_optional_int(options, "n_steps", 1, max_n_steps),
        top_k=_optional_int(options, "top_k", 1, 1000),
        html=html,
        priority=_optional_str(options, "priority"),
        deadline_ms=_optional_int(options, "deadline_ms", 1, MAX_DEADLINE_MS),
    )


def resolve_target(target: Target, labels: list[str], field: str = "target") -> Optional[int]:
    """Class index for ``target`` (or the ``contrast`` class) given the model's labels (index order)."""
    if target is None:
        return None
    if isinstance(target, int):
        if not 0 <= target < len(labels):
            raise RequestError(f"{field} index {target} is out of range [0, {len(labels) - 1}]", f"unknown_{field}")
        return target
    if target in labels:
        return labels.index(target)
    if target.lstrip("-").isdigit():
        return resolve_target(int(target), labels, field)
    raise RequestError(f"unknown {field} label {target[:64]!r}", f"unknown_{field}")
