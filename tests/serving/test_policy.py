"""The explanation gate: policy, priority, token, per-batch cap; secrets loading."""
import pytest

from tsexplain.serving.errors import ConfigError, RequestError
from tsexplain.serving.policy import DENIAL_CAUSES, ExplanationGate, load_secret, lower_case_headers


def gate(**overrides):
    settings = dict(enabled=True, policy="all", priority_header="X-Priority", priority_values=["high", "audit"],
                    on_denied="reject", max_per_batch=None, secret=None)
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
    g = gate(secret=b"s3cret")
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


def test_load_secret_from_env_and_file(tmp_path):
    assert load_secret("MY_TOKEN", None, {"MY_TOKEN": " abc \n"}) == b"abc"
    token_file = tmp_path / "token"
    token_file.write_text("xyz\n")
    assert load_secret(None, str(token_file), {}) == b"xyz"
    assert load_secret(None, None, {}) is None
    with pytest.raises(ConfigError, match="MY_TOKEN"):
        load_secret("MY_TOKEN", None, {})
    with pytest.raises(ConfigError, match="cannot read"):
        load_secret(None, str(tmp_path / "missing"), {})
    token_file.write_text("  ")
    with pytest.raises(ConfigError, match="empty"):
        load_secret(None, str(token_file), {})


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
    assert gate(secret=b"s").decide({}, None, 0).cause == "token"
    assert gate(policy="priority").decide({}, None, 0).cause == "priority"
    assert gate(max_per_batch=0).decide({}, None, 0).cause == "batch_cap"
    assert gate().decide({}, None, 0).cause == ""
    assert {"disabled", "route", "token", "priority", "batch_cap"} == set(DENIAL_CAUSES)
