"""Named explain tokens: the caller's name from the token it presented, never the token."""
import pytest

from tsexplain.serving.errors import ConfigError
from tsexplain.serving.tokens import DEFAULT_NAME, ExplainTokens, parse_token_specs


def test_named_tokens_match_their_names(tmp_path):
    secret_file = tmp_path / "team-b"
    secret_file.write_text("  bee-secret\n")
    specs = parse_token_specs({"team-a": {"env": "TEAM_A"}, "team-b": {"file": str(secret_file)}})
    tokens = ExplainTokens.load(specs, None, None, {"TEAM_A": "ay-secret"})
    assert tokens.required and tokens.names == ["team-a", "team-b"]
    assert tokens.match("ay-secret") == "team-a" and tokens.match(b"bee-secret") == "team-b"
    assert tokens.match("bee-secret ") is None and tokens.match("ay") is None
    assert tokens.match("") is None and tokens.match(None) is None


def test_the_single_token_still_works_as_default():
    tokens = ExplainTokens.load((), "EXPLAIN_TOKEN", None, {"EXPLAIN_TOKEN": "s3"})
    assert tokens.match("s3") == DEFAULT_NAME and tokens.match("s4") is None
    both = ExplainTokens.load(parse_token_specs({"audit": {"env": "A"}}), "EXPLAIN_TOKEN", None,
                              {"EXPLAIN_TOKEN": "s3", "A": "s5"})
    assert both.match("s3") == DEFAULT_NAME and both.match("s5") == "audit"
    none = ExplainTokens.load((), None, None, {})
    assert not none.required and none.match("anything") is None


@pytest.mark.parametrize("config,message", [
    ([], "must be a mapping"),
    ({}, "must be a mapping"),
    ({"team a": {"env": "A"}}, "not a valid token name"),
    ({"default": {"env": "A"}}, "reserved"),
    ({"team-a": "A"}, r"explain.tokens.team-a must be"),
    ({"team-a": {"env": "A", "file": "/f"}}, "exactly one"),
    ({"team-a": {"vault": "A"}}, "exactly one"),
    ({"team-a": {"env": ""}}, r"explain.tokens.team-a.env must be"),
])
def test_bad_token_config_names_the_key(config, message):
    with pytest.raises(ConfigError, match=message):
        parse_token_specs(config)


def test_missing_or_shared_secrets_fail_at_load(tmp_path):
    specs = parse_token_specs({"team-a": {"env": "A"}, "team-b": {"env": "B"}})
    with pytest.raises(ConfigError, match="explain.tokens.team-b.env names B"):
        ExplainTokens.load(specs, None, None, {"A": "x"})
    with pytest.raises(ConfigError, match="'team-a' and 'team-b' have the same secret"):
        ExplainTokens.load(specs, None, None, {"A": "x", "B": "x"})
    with pytest.raises(ConfigError, match="explain.tokens.c.file"):
        ExplainTokens.load(parse_token_specs({"c": {"file": str(tmp_path / "none")}}), None, None, {})
    with pytest.raises(ConfigError, match="explain.token_env names T"):
        ExplainTokens.load((), "T", None, {})


def test_only_the_exact_token_matches():
    tokens = ExplainTokens.load(parse_token_specs({"team-a": {"env": "A"}}), None, None, {"A": "ay-secret"})
    assert [t for t in (f"guess-{i}" for i in range(3000)) if tokens.match(t) is not None] == []
