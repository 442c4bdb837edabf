"""KServe v1 and v2 request bodies: split a request into instances, and put the
per-instance answers back into one KServe response.

Plain Python, no TorchServe import. The batch flow answers each instance as if it
had come alone (:mod:`tsexplain.serving.flow`); this module only translates.

v1 (``POST /v1/models/{m}:predict`` and ``:explain``)::

    {"instances": [<instance>, ...], "parameters": {...}}   # "parameters": optional
    -> {"predictions": [<entry>, ...]}   or   {"explanations": [<entry>, ...]}

An instance is what a plain JSON request body would be (``{"data": ..., "target": ...}``,
``"b64"`` accepted for ``"data"``) or a bare string (base64 image, or text).

v2 (``POST /v2/models/{m}/infer`` and ``/explain``), one ``BYTES`` input whose
elements are the instances (strings; a string holding a JSON object carries options)::

    {"id": "...", "inputs": [{"name": "input-0", "shape": [N], "datatype": "BYTES",
                              "data": [<string>, ...]}], "parameters": {...}}
    -> {"id": ..., "model_name": ..., "model_version": ...,
        "outputs": [{"name": "predictions" | "explanations", "shape": [N], "datatype": "BYTES",
                     "data": [<entry as a JSON string>, ...]}]}

``parameters`` are request-wide defaults for the instances' options (``target``,
``method``, ``n_steps``, ...); an instance's own fields win. An entry is the body
the instance would get alone; a failed instance's entry is
``{"error": <message>, "type": <type>, "code": <HTTP status>}``, and the other
instances are unaffected. The response is 200 when at least one instance
succeeded, else the largest of the instances' codes.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Optional

from .errors import RequestError

V1, V2 = "v1", "v2"
BAD_REQUEST = "bad_kserve_request"


@dataclass(frozen=True)
class KServeRequest:
    """One KServe request, split into instances (each a plain request body)."""

    protocol: str  # "v1" or "v2"
    instances: list
    request_id: Optional[str] = None  # v2 "id"
    input_name: Optional[str] = None  # v2 input name


def _json_object(body: Any) -> Optional[dict]:
    if isinstance(body, dict):
        return body
    if isinstance(body, (bytes, bytearray)):
        if not bytes(body[:64]).lstrip().startswith(b"{"):
            return None
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(body, str) and body.lstrip().startswith("{"):
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, dict) else None
    return None


def detect(body: Any) -> Optional[dict]:
    """The JSON object of ``body`` when it is a KServe v1/v2 request, else ``None``.

    ``instances`` (v1) and ``inputs`` (v2) are not fields of the plain protocol,
    so a plain request is never taken for a KServe one.
    """
    obj = _json_object(body)
    if obj is not None and ("instances" in obj or "inputs" in obj):
        return obj
    return None


def _with_defaults(instance: Any, parameters: dict) -> Any:
    if isinstance(instance, dict):
        if "b64" in instance and "data" not in instance:
            instance = {("data" if k == "b64" else k): v for k, v in instance.items()}
        return {**parameters, **instance} if parameters else instance
    if parameters:
        return {**parameters, "data": instance}
    return instance


def split_request(obj: dict, max_instances: int) -> KServeRequest:
    """Validate a KServe body (from ``detect``) and split it into instance bodies.

    Raises ``RequestError`` (``bad_kserve_request``; ``too_many_instances`` past ``max_instances``)
    for a body whose envelope is wrong; problems of one instance are left to the
    instance's own parsing.
    """
    parameters = obj.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RequestError("'parameters' must be a JSON object of request options", BAD_REQUEST)
    if "instances" in obj:
        unknown = sorted(set(obj) - {"instances", "parameters"})
        if unknown:
            raise RequestError(f"unknown KServe v1 field(s) {unknown}; known: ['instances', 'parameters']", BAD_REQUEST)
        instances = obj["instances"]
        if not isinstance(instances, list) or not instances:
            raise RequestError("'instances' must be a non-empty list", BAD_REQUEST)
        _check_count(len(instances), max_instances)
        return KServeRequest(V1, [_with_defaults(i, parameters) for i in instances])

    unknown = sorted(set(obj) - {"id", "inputs", "outputs", "parameters"})
    if unknown:
        raise RequestError(f"unknown KServe v2 field(s) {unknown}", BAD_REQUEST)
    request_id = obj.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError("'id' must be a string", BAD_REQUEST)
    inputs = obj["inputs"]
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError("'inputs' must hold exactly one input tensor (BYTES, one element per instance)",
                           BAD_REQUEST)
    tensor = inputs[0]
    if tensor.get("datatype") != "BYTES":
        raise RequestError(f"input datatype {str(tensor.get('datatype'))[:16]!r} is not supported; send BYTES "
                           "(base64 images or UTF-8 texts)", BAD_REQUEST)
    data, shape = tensor.get("data"), tensor.get("shape")
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], list):
        data = data[0]  # [[...]]: a [1, N] tensor
    if not isinstance(data, list) or not data or not all(isinstance(d, str) for d in data):
        raise RequestError("the input's 'data' must be a non-empty list of strings", BAD_REQUEST)
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in shape) \
            or (-1 not in shape and math.prod(shape) != len(data)):
        raise RequestError(f"the input's 'shape' must be a list of ints matching its {len(data)} element(s)",
                           BAD_REQUEST)
    _check_count(len(data), max_instances)
    name = tensor.get("name")
    instances = [_with_defaults(_element(d), parameters) for d in data]
    return KServeRequest(V2, instances, request_id, name if isinstance(name, str) else None)


def _element(value: str) -> Any:
    """A v2 BYTES element: a JSON object string carries options, anything else is the data."""
    obj = _json_object(value)
    return obj if obj is not None else value


def _check_count(count: int, max_instances: int) -> None:
    if count > max_instances:
        raise RequestError(f"{count} instances in one request, over the limit of {max_instances}",
                           "too_many_instances")


def error_entry(error_body: dict) -> dict:
    """A failed instance's entry (or a whole request's error body), KServe style:
    ``{"error": message, "type": ..., "code": ...}``."""
    return {"error": error_body.get("message", ""), "type": error_body.get("type", "bad_request"),
            "code": error_body.get("code", 400)}


def overall_status(statuses: list[int]) -> int:
    """200 when any instance succeeded, else the largest of their codes."""
    return 200 if any(s == 200 for s in statuses) else max(statuses)


def response(request: KServeRequest, explain: bool, entries: list, request_id: str = "",
             model_name: str = "", model_version: Optional[str] = None) -> dict:
    """The KServe response body holding one entry per instance, in order."""
    key = "explanations" if explain else "predictions"
    if request.protocol == V1:
        return {key: entries}
    return {
        "id": request.request_id or request_id,
        "model_name": model_name,
        "model_version": model_version,
        "outputs": [{"name": key, "shape": [len(entries)], "datatype": "BYTES",
                     "data": [json.dumps(e, separators=(",", ":"), ensure_ascii=False) for e in entries]}],
    }
