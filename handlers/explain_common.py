"""TorchServe glue shared by the explainer handlers: per-request answers.

Every request of a batch gets its own status and body: a bad request is
answered with its 4xx error while the others go on.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Optional

from tsexplain.errors import RequestError

logger = logging.getLogger(__name__)
JSON_CONTENT_TYPE = "application/json"


@dataclass
class Prepared:
    """One valid request of a batch, ready for the shared forward pass."""

    idx: int  # position in the batch
    request: Any  # the parsed request
    explain: bool
    target: Optional[int]  # class index, None for the predicted class
    inputs: Any  # this request's model input
    original: Any = None  # what the input was made from (the decoded image)


def is_explain_request(context, idx: int) -> bool:
    """True when request ``idx`` came through an explanation route."""
    return context.get_request_header(idx, "explain") == "True"


def log_batch(data, explained: int) -> None:
    """One line per batch: its size and how many requests were explained."""
    logger.info("batch size=%d explained=%d", len(data), explained)


def answer(context, idx: int, body: Any, status: int = 200) -> str:
    """Compact JSON body for request ``idx``, with its status and content type."""
    context.set_response_status(status, "OK" if status == 200 else "", idx)
    context.set_response_content_type(idx, JSON_CONTENT_TYPE)
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def answer_error(context, idx: int, error: RequestError) -> str:
    context.set_response_status(error.status, error.kind, idx)
    context.set_response_content_type(idx, JSON_CONTENT_TYPE)
    return json.dumps(error.to_json(), separators=(",", ":"))


def explanation_failed(exc: BaseException) -> RequestError:
    """The error a request gets when its explanation raised (not its own fault)."""
    out_of_memory = "out of memory" in str(exc).lower() or isinstance(exc, MemoryError)
    if out_of_memory:
        return RequestError("the explanation ran out of memory; the prediction was not affected", "out_of_memory", 507)
    return RequestError("the explanation failed on the server", "explanation_failed", 503)
