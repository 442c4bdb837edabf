"""The request: ONE table of fields, used by the parser, the settings, the override
check and the README's reference (tests/serving/test_schema.py checks the README).

A body is raw bytes (an image, or UTF-8 text) or a JSON object with ``data`` and
options. TorchServe hands the body over already decoded when the client sent
``Content-Type: application/json`` (a dict or list), as text for ``text/*``,
and as bytes otherwise; undecodable JSON arrives as bytes.

Each :class:`Field` says which kind of model takes it, how it is parsed and
bounded, where its default comes from (a setting), and whether
``explain.request_overrides`` may forbid it. :func:`parse` splits a body into a
:class:`Request` once; :func:`effective` fills in the defaults.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

from ..attr.names import IMAGE_METHODS, INTEGRATING_METHODS, MAX_TEXT_N_STEPS, TEXT_METHODS
from .errors import RequestError

IMAGE, TEXT = "image", "text"
MODALITIES = (IMAGE, TEXT)
METHODS = {IMAGE: IMAGE_METHODS, TEXT: TEXT_METHODS}
IMAGE_OUTPUTS = ("heatmap", "overlay_png")
HEATMAP_SIZES = ("feature", "input")
MAX_TOP_K = 1000
MAX_DEADLINE_MS = 3_600_000  # the model's explain.deadline_ms bounds it further
MAX_N_STEPS = {IMAGE: 10_000, TEXT: MAX_TEXT_N_STEPS}  # bounds of explain.max_n_steps, each model's own bound

Target = Union[int, str, None]  # index, label, or None for the predicted class


@dataclass(frozen=True)
class Limits:
    """The bounds a model's settings put on its requests."""

    max_n_steps: int  # explain.max_n_steps
    max_text_chars: int = 0  # handler.max_text_chars (text models)


# -- value parsers: (value, limits, modality) -> value, or RequestError bad_<field> ----------


def _string(name):
    def parse(value, limits, modality):
        if not isinstance(value, str):
            raise RequestError(f"'{name}' must be a string", f"bad_{name}")
        return value
    return parse


def _int(name, low, high: Callable[[Limits, str], int]):
    def parse(value, limits, modality):
        top = high(limits, modality)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= top:
            raise RequestError(f"'{name}' must be an integer in [{low}, {top}]", f"bad_{name}")
        return value
    return parse


def _target(name):
    def parse(value, limits=None, modality=None):
        """``"predicted"`` (target only) → None; an int index; or a label string."""
        if value is None or (value == "predicted" and name == "target"):
            return None
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            choices = 'a class index, a label or "predicted"' if name == "target" else "a class index or a label"
            raise RequestError(f"'{name}' must be {choices}", f"bad_{name}")
        if isinstance(value, str) and not value.strip():
            raise RequestError(f"'{name}' is an empty string", f"bad_{name}")
        return value
    return parse


def _method(value, limits, modality):
    value = _string("method")(value, limits, modality)
    if value not in METHODS[modality]:
        raise RequestError(f"unknown method {value[:32]!r}; known: {list(METHODS[modality])}", "unknown_method")
    return value


def _outputs(value, limits, modality):
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(o, str) for o in value):
        raise RequestError("'outputs' must be a list of strings", "bad_outputs")
    unknown = sorted(set(value) - set(IMAGE_OUTPUTS))
    if unknown:
        raise RequestError(f"unknown output(s) {unknown}; known: {list(IMAGE_OUTPUTS)}", "bad_outputs")
    return tuple(dict.fromkeys(value))


def _heatmap_size(value, limits, modality):
    if value not in HEATMAP_SIZES:
        raise RequestError(f"'heatmap_size' must be one of {list(HEATMAP_SIZES)}", "bad_heatmap_size")
    return value


def _bool(name):
    def parse(value, limits, modality):
        if not isinstance(value, bool):
            raise RequestError(f"'{name}' must be true or false", f"bad_{name}")
        return value
    return parse


def _data(value, limits, modality):
    if modality == IMAGE:
        if not isinstance(value, str):
            raise RequestError("'data' must be a base64-encoded image string", "bad_data")
        return decode_base64(value)
    return text_body(value, limits.max_text_chars)


def decode_base64(text: str) -> bytes:
    """Strict base64 (standard or URL-safe alphabet, padding optional, data URLs too)."""
    if text.startswith("data:") and "," in text:  # a data URL
        text = text.split(",", 1)[1]
    cleaned = "".join(text.split())
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        if "-" in cleaned or "_" in cleaned:
            return base64.urlsafe_b64decode(cleaned)
        return base64.b64decode(cleaned, validate=True)
    except (ValueError, TypeError):
        raise RequestError("'data' is not valid base64", "bad_base64") from None


def text_body(value: Any, max_chars: int) -> str:
    """The text of a body or of a ``data`` field: UTF-8, not blank, at most ``max_chars``."""
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
        raise RequestError(f"the text has {len(value)} characters, over the limit of {max_chars}", "text_too_long")
    return value


@dataclass(frozen=True)
class Field:
    """One request field.

    Attributes:
        name: the JSON key.
        modalities: the kinds of model that take it.
        type: its type, in words (README).
        parse: ``parse(value, limits, modality)`` → the checked value, or a ``RequestError``.
        default: per modality, the setting that gives its value when the request leaves it
            out (``"explain.n_steps"``), ``"required"``, or ``None`` for none.
        meaning: per modality (or ``"*"`` for both), what it does (README).
        overridable: ``explain.request_overrides`` decides whether requests may set it.
    """

    name: str
    modalities: tuple
    type: str
    parse: Callable[[Any, Limits, str], Any]
    default: Mapping[str, Optional[str]]
    meaning: Mapping[str, str]
    overridable: bool = True


def _both(value):
    return {IMAGE: value, TEXT: value}


FIELDS: tuple[Field, ...] = (
    Field("data", MODALITIES, "string", _data, _both("required"),
          {IMAGE: "the image, base64 (standard or URL-safe; a `data:` URL works)",
           TEXT: "the text (any Unicode; empty or whitespace-only is a 400)"}, overridable=False),
    Field("target", MODALITIES, 'int, label or `"predicted"`', _target("target"), _both(None),
          {"*": "the class to explain (default: the predicted class)"}),
    Field("contrast", MODALITIES, "int or label", _target("contrast"), _both(None),
          {"*": "explain `target` *rather than* this class: the attributed score is `logit[target] − "
                "logit[contrast]`; must differ from the explained class (the predicted one when `target` is "
                "left out)"}),
    Field("method", MODALITIES, "string", _method, _both("explain.method"),
          {m: "`" + "`, `".join(METHODS[m]) + "`: the method, one of `explain.methods` (others: "
              "`method_not_allowed`)" for m in MODALITIES}),
    Field("n_steps", MODALITIES, "int", _int("n_steps", 1, lambda limits, modality: limits.max_n_steps),
          _both("explain.n_steps"),
          {m: "integration steps of `" + "` and `".join(i for i in INTEGRATING_METHODS if i in METHODS[m])
              + "`, at most `explain.max_n_steps` (`bad_n_steps` with the other methods)" for m in MODALITIES}),
    Field("outputs", (IMAGE,), "list of `" + "`, `".join(IMAGE_OUTPUTS) + "`", _outputs, {IMAGE: "explain.outputs"},
          {IMAGE: "what to return"}),
    Field("heatmap_size", (IMAGE,), "`" + "` or `".join(HEATMAP_SIZES) + "`", _heatmap_size,
          {IMAGE: "explain.heatmap_size"}, {IMAGE: "feature-map resolution, or the model's input size"}),
    Field("top_k", MODALITIES, "int", _int("top_k", 1, lambda limits, modality: MAX_TOP_K),
          {IMAGE: "handler.top_k", TEXT: "explain.top_k_words"},
          {IMAGE: f"how many predictions to list (at most {MAX_TOP_K})",
           TEXT: f"how many words in `top_words` (at most {MAX_TOP_K})"}),
    Field("html", (TEXT,), "bool", _bool("html"), {TEXT: "explain.html"},
          {TEXT: "also return an HTML snippet with the words highlighted"}),
    Field("priority", MODALITIES, "string", _string("priority"), _both(None),
          {"*": "counts as priority when its value is in `explain.priority_values`"}, overridable=False),
    Field("deadline_ms", MODALITIES, "int", _int("deadline_ms", 1, lambda limits, modality: MAX_DEADLINE_MS),
          _both("explain.deadline_ms"),
          {"*": "a shorter deadline for this explanation (at most the model's `explain.deadline_ms`)"}),
)


def fields(modality: str) -> dict[str, Field]:
    """The fields a ``modality`` model takes, by name, in table order."""
    return {f.name: f for f in FIELDS if modality in f.modalities}


def override_fields(modality: str) -> tuple[str, ...]:
    """The fields ``explain.request_overrides`` may list for a ``modality`` model."""
    return tuple(name for name, f in fields(modality).items() if f.overridable)


def meaning(field: Field, modality: str) -> str:
    return field.meaning.get(modality, field.meaning.get("*", ""))


class Request:
    """One parsed request: ``data`` (image bytes or text) and the fields it set.

    A field it left out reads as None (``request.n_steps``); :func:`effective` gives
    the values with the model's defaults.
    """

    __slots__ = ("modality", "data", "given")

    def __init__(self, modality: str, data, given: Optional[Mapping[str, Any]] = None):
        self.modality = modality
        self.data = data
        self.given = dict(given or {})

    def __getattr__(self, name):
        if name in FIELD_NAMES:
            return self.given.get(name)
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"Request({self.modality}, fields={sorted(self.given)})"


FIELD_NAMES = frozenset(f.name for f in FIELDS)


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


def json_object(body: Any) -> Optional[dict]:
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


def parse(row: Mapping[str, Any], modality: str, limits: Limits) -> Request:
    """Validate one request row of a ``modality`` model. Decoding the image itself happens later."""
    body = request_body(row)
    options = json_object(body)
    if options is None:  # a raw body
        if modality == IMAGE:
            if isinstance(body, str):
                return Request(modality, decode_base64(body))
            if not isinstance(body, (bytes, bytearray)):
                raise RequestError("expected image bytes or a JSON object with 'data'", "bad_json")
            return Request(modality, bytes(body))
        if isinstance(body, (dict, list)) or not isinstance(body, (bytes, bytearray, str)):
            raise RequestError("expected text or a JSON object with 'data'", "bad_json")
        return Request(modality, text_body(body, limits.max_text_chars))
    known = fields(modality)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; known: {sorted(known)}", "unknown_field")
    if modality == TEXT and "data" not in options:
        raise RequestError("'data' must be a string of text", "bad_data")
    given = {name: known[name].parse(value, limits, modality) for name, value in options.items()
             if value is not None or name == "data"}
    data = given.pop("data", None)
    if data is None:
        raise RequestError("'data' must be a base64-encoded image string", "bad_data")
    return Request(modality, data, given)


def effective(request: Request, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Every field but ``data`` with the model's defaults filled in. ``settings``: the
    model's settings by dotted key (``{"explain.n_steps": 50, ...}``). ``n_steps`` is
    None for a method that does not integrate (a request that sets it then is a 400)."""
    values = {}
    for name, field in fields(request.modality).items():
        if name == "data":
            continue
        value = request.given.get(name)
        source = field.default[request.modality]
        values[name] = settings[source] if value is None and source not in (None, "required") else value
    if values["method"] not in INTEGRATING_METHODS:
        if request.n_steps is not None:
            raise RequestError(f"'n_steps' applies to {list(INTEGRATING_METHODS)}, not {values['method']}",
                               "bad_n_steps")
        values["n_steps"] = None
    return values


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
