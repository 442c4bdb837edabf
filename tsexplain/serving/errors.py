"""Every error a client can get, with its HTTP status: the one place statuses live.

A request that cannot be answered as asked raises :class:`RequestError` with a
*type* from :data:`ERROR_TYPES`; the status comes from that table. Errors raised
by the maths (:mod:`tsexplain.attr.errors`), by deadlines and by the explanation
itself are turned into request errors by :func:`explanation_error`, here too.
"""
from __future__ import annotations

from ..attr.errors import AttributionInputError, EmptyText, SameClass, TooManyWords, UnknownClass

# type -> (status, when). README's "Errors" lists the same (tests/serving/test_errors.py checks it).
ERROR_TYPES: dict[str, tuple[int, str]] = {
    # the body
    "empty_body": (400, "the request has no body"),
    "bad_json": (400, "the body is not the JSON object expected"),
    "unknown_field": (400, "a JSON field this model does not know"),
    "bad_data": (400, "'data' is not an image string or a text"),
    "bad_base64": (400, "'data' is not valid base64"),
    "bad_image": (400, "the bytes are not a complete image"),
    "bad_encoding": (400, "the text is not valid UTF-8"),
    "empty_text": (400, "the text is empty, whitespace only, or has no tokens"),
    "image_too_large": (413, "more pixels than handler.max_image_pixels"),
    "text_too_long": (413, "more characters than handler.max_text_chars"),
    # the fields (bad_<field>: wrong type or out of bounds; unknown_<field>: no such class or method)
    "bad_target": (400, "'target' is not a class index, a label or \"predicted\""),
    "unknown_target": (400, "no such class"),
    "bad_contrast": (400, "'contrast' is not a class, or it is the explained class"),
    "unknown_contrast": (400, "no such class"),
    "bad_method": (400, "'method' is not a string"),
    "unknown_method": (400, "no such method for this kind of model"),
    "bad_n_steps": (400, "'n_steps' out of bounds, or given to a method that does not integrate"),
    "bad_outputs": (400, "'outputs' names an unknown output"),
    "bad_heatmap_size": (400, "'heatmap_size' is not feature or input"),
    "bad_top_k": (400, "'top_k' out of bounds"),
    "bad_html": (400, "'html' is not true or false"),
    "bad_priority": (400, "'priority' is not a string"),
    "bad_deadline_ms": (400, "'deadline_ms' out of bounds, or over the model's explain.deadline_ms"),
    "override_not_allowed": (400, "a field explain.request_overrides does not allow"),
    "bad_request": (400, "any other malformed request"),
    "bad_kserve_request": (400, "a malformed KServe v1/v2 envelope"),
    "too_many_instances": (413, "more KServe instances than explain.max_instances"),
    "too_many_words": (413, "more words than occlusion explains (explain.occlusion_max_words)"),
    # the gate
    "explanation_denied": (403, "the explanation policy, priority or token denies it"),
    "method_not_allowed": (403, "a known method not in explain.methods"),
    "too_many_explanations": (429, "more explanations in one batch than explain.max_per_batch"),
    # the model
    "method_unsupported": (422, "this model cannot run the method (a TorchScript model has no hooks: CAM methods, layer_ig)"),
    # the server
    "explanation_failed": (503, "the explanation failed on the server; the prediction was not affected"),
    "overloaded": (503, "more requests in the worker than explain.async_max_queued"),
    "server_error": (503, "the request failed in the worker"),
    "audit_unavailable": (503, "the explanation could not be recorded in the audit trail (explain.audit.on_failure: fail)"),
    "deadline_exceeded": (504, "the explanation ran past its deadline"),
    "out_of_memory": (507, "the explanation ran out of memory; the prediction was not affected"),
}


class RequestError(Exception):
    """A problem with one request, answered with its type's status and a JSON body.

    ``kind`` is a type of :data:`ERROR_TYPES` (``"bad_image"``, ``"unknown_target"``),
    ``message`` says what was wrong in words a client can act on. Neither may hold
    payload bytes, tokens or attribution values.
    """

    def __init__(self, message: str, kind: str = "bad_request"):
        if kind not in ERROR_TYPES:
            raise ValueError(f"unknown error type {kind!r}: add it to ERROR_TYPES")
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.status = ERROR_TYPES[kind][0]

    def to_json(self) -> dict:
        return {"code": self.status, "type": self.kind, "message": self.message}


class DeadlineExceeded(RuntimeError):
    """Explanation work went past its deadline (:mod:`.deadline` raises it).

    Attributes:
        limit_ms: the deadline's length in milliseconds.
        elapsed_ms: how long the work had run when it was stopped.
    """

    def __init__(self, limit_ms: float, elapsed_ms: float):
        super().__init__(f"deadline of {limit_ms:g} ms exceeded after {elapsed_ms:.0f} ms")
        self.limit_ms = limit_ms
        self.elapsed_ms = elapsed_ms


class ConfigError(ValueError):
    """Invalid settings or an unusable model: raised at load (and build) time, so the
    model fails to load loudly instead of serving wrong answers."""


def input_error(exc: AttributionInputError) -> RequestError:
    """The request error for an input the maths cannot explain."""
    if isinstance(exc, EmptyText):
        return RequestError(str(exc), "empty_text")
    if isinstance(exc, TooManyWords):
        return RequestError(str(exc), "too_many_words")
    if isinstance(exc, UnknownClass):
        return RequestError(str(exc), f"unknown_{exc.field}")
    if isinstance(exc, SameClass):
        return RequestError(str(exc), "bad_contrast")
    return RequestError(str(exc), "bad_request")


def explanation_error(exc: BaseException, limit_ms: float | None = None) -> RequestError:
    """The error a request gets when its explanation raised ``exc``: its own input's
    fault (4xx), its deadline (504, ``limit_ms`` the deadline), memory (507), or the
    server's (503)."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, AttributionInputError):
        return input_error(exc)
    if isinstance(exc, DeadlineExceeded):
        limit = exc.limit_ms if limit_ms is None else limit_ms
        return RequestError(f"the explanation did not finish within its deadline of {limit:g} ms "
                            "(explain.deadline_ms, or the request's deadline_ms)", "deadline_exceeded")
    if "out of memory" in str(exc).lower() or isinstance(exc, MemoryError):
        return RequestError("the explanation ran out of memory; the prediction was not affected", "out_of_memory")
    return RequestError("the explanation failed on the server", "explanation_failed")
