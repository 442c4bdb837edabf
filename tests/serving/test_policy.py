"""The explanation gate: policy, priority, named tokens and the caller, per-batch cap."""
import pytest

from tsexplain.serving.errors import RequestError
from tsexplain.serving.policy import DENIAL_CAUSES, ExplanationGate, lower_case_headers
from tsexplain.serving.tokens import ExplainTokens, parse_token_specs


def gate(**overrides):
    settings = dict(enabled=True, policy="all", priority_header="X-Priority", priority_values=["high", "audit"],
                    on_denied="reject", max_per_batch=None, tokens=None)
    settings.update(overrides)
    return ExplanationGate(**settings)


def test_all_allows_and_off_denies():
    assert gate().decide({}, None, 0).allowed
    for g in (gate(policy="off"), gate(enabled=False)):
        decision = g.decide({"x-priority": "high"}, "high", 0)
        assert not decision.allowed and decision.kind == "explanation_denied" and "disabled" in decision.reason
        assert RequestError(decision.reason, decision.kind).status == 403


@pytest.mark.parametrize("headers,body,allowed", [
    ({"x-priority": "high"}, None, True),
    ({"x-priority": "AUDIT "}, None, True),
    ({}, "Audit", True),
    ({"x-priority": "low"}, None, False),
    ({"x-priority": "low"}, "low", False),
    ({}, None, False),
])
def test_priority(headers, body, allowed):
    assert gate(policy="priority").decide(headers, body, 0).allowed is allowed


def test_custom_priority_header_is_case_insensitive():
    g = gate(policy="priority", priority_header="X-Tenant-Tier", priority_values=["gold"])
    assert g.decide(lower_case_headers({"X-TENANT-TIER": "gold"}), None, 0).allowed
    assert not g.decide(lower_case_headers({"X-Priority": "gold"}), None, 0).allowed


def test_token_missing_wrong_right():
    g = gate(tokens=b"s3cret")
    assert not g.decide({}, None, 0).allowed
    assert not g.decide({"x-explain-token": "s3cre"}, None, 0).allowed
    assert not g.decide({"x-explain-token": "s3cret!"}, None, 0).allowed
    assert g.decide({"x-explain-token": "s3cret"}, None, 0).allowed
    assert "s3cret" not in g.decide({}, None, 0).reason


def test_per_batch_cap_is_429():
    g = gate(max_per_batch=2)
    assert g.decide({}, None, 1).allowed
    decision = g.decide({}, None, 2)
    assert not decision.allowed and decision.kind == "too_many_explanations"
    assert RequestError(decision.reason, decision.kind).status == 429
    assert not gate(max_per_batch=0).decide({}, None, 0).allowed


def test_the_decision_names_the_caller_never_the_token():
    tokens = ExplainTokens.load(parse_token_specs({"team-a": {"env": "A"}, "team-b": {"env": "B"}}), "T", None,
                                {"A": "ay", "B": "bee", "T": "single"})
    g = gate(tokens=tokens, policy="priority")
    assert g.decide({"x-explain-token": "bee", "x-priority": " Audit "}, None, 0).caller == "team-b"
    decision = g.decide({"x-explain-token": "single"}, "high", 0)
    assert decision.allowed and decision.caller == "default" and decision.priorities == ("high",)
    assert not g.decide({"x-explain-token": "bee"}, None, 0).allowed  # a caller, not a priority request
    assert not g.decide({"x-explain-token": "team-a", "x-priority": "high"}, None, 0).allowed  # the name is no token
    assert gate().decide({"x-explain-token": "ay"}, None, 0).caller is None  # no tokens: no caller
    both = gate().decide({"x-priority": "audit"}, "high", 0)
    assert both.priorities == ("audit", "high") and "ay" not in repr(g.decide({"x-explain-token": "ay"}, "high", 0))


def test_lower_case_headers_drops_non_string_entries():
    assert lower_case_headers({"X-Priority": "high", "body": {"content-type": "x"}}) == {"x-priority": "high"}


def test_routes_explanations_only_denies_the_kserve_routes():
    strict = gate(routes=["explanations"])
    assert strict.decide({}, None, 0, route="explanations").allowed
    decision = strict.decide({}, None, 0, route="kserve")
    assert not decision.allowed and "/explanations only" in decision.reason
    assert gate().decide({}, None, 0, route="kserve").allowed


def test_every_denial_names_its_cause():
    """The ExplanationsDenied metric's Reason label."""
    assert gate(enabled=False).decide({}, None, 0).cause == "disabled"
    assert gate(routes=["explanations"]).decide({}, None, 0, route="kserve").cause == "route"
    assert gate(tokens=b"s").decide({}, None, 0).cause == "token"
    assert gate(policy="priority").decide({}, None, 0).cause == "priority"
    assert gate(max_per_batch=0).decide({}, None, 0).cause == "batch_cap"
    assert gate().decide({}, None, 0).cause == ""
    assert {"disabled", "route", "token", "priority", "batch_cap"} == set(DENIAL_CAUSES)
