"""explain.audit settings: defaults, environment overrides, loud validation."""
import pytest

from tsexplain.serving.errors import ConfigError
from tsexplain.serving.audit.settings import AuditSettings, env_names, redact, sink_kind, sqlite_path


def test_default_records_nothing():
    s = AuditSettings.load(None, "shapes", {})
    assert s.record == "none" and not s.enabled and s.sink is None and s.on_failure == "fail"
    assert not s.keep_input and s.retention_days is None and s.sqlite_synchronous == "full"
    assert not s.selects("audit") and not s.selects(None)


def test_selection_by_priority_value():
    s = AuditSettings.load({"record": "priority", "priority_values": ["Audit", "legal"], "sink": "sqlite:///tmp/a.db"},
                           "m", {})
    assert s.selects("audit") and s.selects(" LEGAL ") and not s.selects("high") and not s.selects(None)
    assert AuditSettings(record="all", sink="sqlite:///tmp/a.db").selects(None)
    assert AuditSettings.load({"record": False}, "m", {}).record == "none"  # YAML's unquoted `off`


def test_environment_overrides_model_specific_first():
    env = {"TSEXPLAIN_AUDIT_RECORD": "all", "TSEXPLAIN_AUDIT_SINK": "sqlite:///srv/all.db",
           "TSEXPLAIN_MY_MODEL_AUDIT_SINK": "postgresql://audit@db/trail", "TSEXPLAIN_AUDIT_RETENTION_DAYS": "200",
           "TSEXPLAIN_RECORD": "none"}  # not an audit variable
    s = AuditSettings.load({"record": "none", "keep_input": True}, "my-model", env)
    assert (s.record, s.sink, s.retention_days, s.keep_input) == ("all", "postgresql://audit@db/trail", 200, True)
    assert env_names("my-model", "sink") == ["TSEXPLAIN_MY_MODEL_AUDIT_SINK", "TSEXPLAIN_AUDIT_SINK"]
    other = AuditSettings.load({}, "other", env)
    assert other.sink == "sqlite:///srv/all.db"


@pytest.mark.parametrize("section,message", [
    ({"recrd": "all"}, "unknown setting"),
    ({"record": "some"}, "explain.audit.record"),
    ({"record": "all"}, "explain.audit.sink must be set"),
    ({"record": "all", "sink": "sqlite:///relative/../x.db/"}, "absolute file path"),
    ({"record": "all", "sink": "sqlite://audit.db"}, "absolute file path"),
    ({"record": "all", "sink": "mysql://db/x"}, "explain.audit.sink must be"),
    ({"sink": 5}, "explain.audit.sink must be a URL"),
    ({"priority_values": []}, "explain.audit.priority_values"),
    ({"keep_input": "yes"}, "explain.audit.keep_input"),
    ({"max_input_bytes": 0}, "explain.audit.max_input_bytes"),
    ({"retention_days": 0}, "explain.audit.retention_days"),
    ({"retention_days": True}, "explain.audit.retention_days"),
    ({"on_failure": "ignore"}, "explain.audit.on_failure"),
    ({"timeout_ms": -1}, "explain.audit.timeout_ms"),
    ({"sqlite_synchronous": "off"}, "explain.audit.sqlite_synchronous"),
])
def test_nonsense_fails_loudly(section, message):
    with pytest.raises(ConfigError, match=message):
        AuditSettings.load(section, "m", {})


def test_bad_env_value_names_the_variable():
    with pytest.raises(ConfigError, match="TSEXPLAIN_M_AUDIT_SINK"):
        AuditSettings.load({}, "m", {"TSEXPLAIN_M_AUDIT_SINK": "[unclosed"})
    with pytest.raises(ConfigError, match="expected a mapping"):
        AuditSettings.load(["all"], "m", {})


def test_sink_urls():
    assert sqlite_path("sqlite:///var/lib/a.db") == "/var/lib/a.db"
    assert sqlite_path("sqlite:////var/lib/a.db") == "/var/lib/a.db"  # SQLAlchemy's absolute spelling
    assert sink_kind("postgres://h/db") == "postgresql" and sink_kind("sqlite:///a.db") == "sqlite"
    assert redact("postgresql://audit:s3cret@db:5432/trail") == "postgresql://audit:***@db:5432/trail"
    assert redact("postgresql://db/trail?sslmode=require&password=s3cret") == "postgresql://db/trail?sslmode=require&password=***"
    assert redact("sqlite:///a.db") == "sqlite:///a.db"
