"""Which requests may get an explanation: policy, priority, token, per-batch cap.

The gate is decided per request. A denied request gets what ``on_denied`` says:
``predict`` answers 200 with its prediction and ``"explanation": null``;
``reject`` answers the decision's error (``explanation_denied``, or
``too_many_explanations`` past the per-batch cap).
"""
from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from .errors import ConfigError

TOKEN_HEADER = "x-explain-token"
EXPLANATIONS, KSERVE = "explanations", "kserve"  # the routes an explanation can come through
ROUTES = (EXPLANATIONS, KSERVE)


DENIAL_CAUSES = ("disabled", "route", "token", "priority", "batch_cap")  # the ExplanationsDenied metric's Reason


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""  # why not, in words safe to send to the client
    kind: str = ""  # the error type a rejected request gets (tsexplain.serving.errors)
    cause: str = ""  # why not, as one of DENIAL_CAUSES (the metric's Reason)


ALLOWED = Decision(True)


def load_secret(token_env: Optional[str], token_file: Optional[str], environ: Mapping[str, str]) -> Optional[bytes]:
    """The explanation token from the environment variable or the file; never logged."""
    if token_env:
        value = environ.get(token_env)
        if value is None or not value.strip():
            raise ConfigError(f"explain.token_env names {token_env}, which is not set or empty")
        return value.strip().encode()
    if token_file:
        path = Path(os.path.expanduser(token_file))
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"explain.token_file {token_file}: cannot read it ({exc.strerror})") from None
        if not value:
            raise ConfigError(f"explain.token_file {token_file} is empty")
        return value.encode()
    return None


class ExplanationGate:
    """Decides, request by request, whether an explanation may be computed.

    Args:
        enabled, policy, priority_header, priority_values, on_denied, max_per_batch, routes:
            the ``explain:`` settings of the same names.
        secret: the token explanations require, or ``None`` for no token.
    """

    def __init__(self, enabled: bool, policy: str, priority_header: str, priority_values, on_denied: str,
                 max_per_batch: Optional[int], secret: Optional[bytes], routes=ROUTES):
        self.enabled = enabled and policy != "off"
        self.routes = set(routes)
        self.policy = policy
        self.priority_header = priority_header.lower()
        self.priority_values = {v.lower() for v in priority_values}
        self.on_denied = on_denied
        self.max_per_batch = max_per_batch
        self.secret = secret

    def decide(self, headers: Mapping[str, str], body_priority: Optional[str], granted_in_batch: int,
               route: str = EXPLANATIONS) -> Decision:
        """``headers``: the request's headers with lower-case names; ``route``: the kind of
        route it came through (``explanations`` or ``kserve``)."""
        denied = "explanation_denied"
        if not self.enabled:
            return Decision(False, "explanations are disabled for this model", denied, "disabled")
        if route not in self.routes:
            return Decision(False, "explanations are served on /explanations only", denied, "route")
        if self.secret is not None:
            sent = headers.get(TOKEN_HEADER, "").encode()
            if not hmac.compare_digest(sent, self.secret):
                return Decision(False, "a valid X-Explain-Token header is required for explanations", denied, "token")
        if self.policy == "priority":
            claimed = {headers.get(self.priority_header, ""), body_priority or ""}
            if not {c.strip().lower() for c in claimed} & self.priority_values:
                return Decision(False, "explanations are served to priority requests only", denied, "priority")
        if self.max_per_batch is not None and granted_in_batch >= self.max_per_batch:
            return Decision(False, "too many explanations in this batch; retry later", "too_many_explanations",
                            "batch_cap")
        return ALLOWED


def lower_case_headers(headers: Mapping) -> dict[str, str]:
    """Request headers with lower-case names (TorchServe keeps the client's case)."""
    return {str(k).lower(): v for k, v in headers.items() if isinstance(v, str)}
