"""Which requests may get an explanation: policy, priority, token, per-batch cap.

The gate is decided per request. A denied request gets what ``on_denied`` says:
``predict`` answers 200 with its prediction and ``"explanation": null``;
``reject`` answers the decision's error (``explanation_denied``, or
``too_many_explanations`` past the per-batch cap).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Union

from .tokens import DEFAULT_NAME, ExplainTokens

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
    caller: Optional[str] = None  # the name of the explain token the request presented (never the token)
    priorities: tuple = ()  # the priority values the request carried: header, then JSON field


class ExplanationGate:
    """Decides, request by request, whether an explanation may be computed.

    Args:
        enabled, policy, priority_header, priority_values, on_denied, max_per_batch, routes:
            the ``explain:`` settings of the same names.
        tokens: the named explain tokens (:class:`~.tokens.ExplainTokens`; one of them is
            required when there are any), a single token as bytes (named ``default``), or
            ``None`` for no token.
    """

    def __init__(self, enabled: bool, policy: str, priority_header: str, priority_values, on_denied: str,
                 max_per_batch: Optional[int], tokens: Union[ExplainTokens, bytes, None], routes=ROUTES):
        self.enabled = enabled and policy != "off"
        self.routes = set(routes)
        self.policy = policy
        self.priority_header = priority_header.lower()
        self.priority_values = {v.lower() for v in priority_values}
        self.on_denied = on_denied
        self.max_per_batch = max_per_batch
        if not isinstance(tokens, ExplainTokens):
            tokens = ExplainTokens({DEFAULT_NAME: tokens} if tokens else {})
        self.tokens = tokens

    def claimed(self, headers: Mapping[str, str], body_priority: Optional[str]) -> tuple:
        """The priority values a request carries (header first), stripped; empty ones left out."""
        values = (headers.get(self.priority_header, ""), body_priority or "")
        return tuple(dict.fromkeys(v.strip() for v in values if isinstance(v, str) and v.strip()))

    def decide(self, headers: Mapping[str, str], body_priority: Optional[str], granted_in_batch: int,
               route: str = EXPLANATIONS) -> Decision:
        """``headers``: the request's headers with lower-case names; ``route``: the kind of
        route it came through (``explanations`` or ``kserve``)."""
        denied = "explanation_denied"
        if not self.enabled:
            return Decision(False, "explanations are disabled for this model", denied, "disabled")
        if route not in self.routes:
            return Decision(False, "explanations are served on /explanations only", denied, "route")
        caller = None
        if self.tokens.required:
            caller = self.tokens.match(headers.get(TOKEN_HEADER))
            if caller is None:
                return Decision(False, "a valid X-Explain-Token header is required for explanations", denied, "token")
        claimed = self.claimed(headers, body_priority)
        if self.policy == "priority" and not {c.lower() for c in claimed} & self.priority_values:
            return Decision(False, "explanations are served to priority requests only", denied, "priority")
        if self.max_per_batch is not None and granted_in_batch >= self.max_per_batch:
            return Decision(False, "too many explanations in this batch; retry later", "too_many_explanations",
                            "batch_cap")
        return Decision(True, caller=caller, priorities=claimed)


def lower_case_headers(headers: Mapping) -> dict[str, str]:
    """Request headers with lower-case names (TorchServe keeps the client's case)."""
    return {str(k).lower(): v for k, v in headers.items() if isinstance(v, str)}
