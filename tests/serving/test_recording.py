"""The flow's recording step with a real SQLite trail and the fake runner of test_flow: one
record per served explanation (computed, fused or cached), committed before its answer is
released; predictions handed over before the write; the failure policy; KServe instances."""
import hashlib
import json
import logging
import sqlite3

import pytest

from test_flow import EXPLAIN, Counting, FakeRunner, rows
from tsexplain.serving.audit import AuditSettings, AuditTrail, Filters, open_store
from tsexplain.serving.cache import ExplanationCache
from tsexplain.serving.flow import ExplainFlow
from tsexplain.serving.policy import ExplanationGate
from tsexplain.serving.settings import load_settings
from tsexplain.serving.tokens import ExplainTokens, parse_token_specs


class RecordingRunner(FakeRunner):
    """The fake runner with what a record needs; ``record_extras`` stands in for the image
    runner's heatmap kept beyond an overlay-only answer."""

    def record_parameters(self, item, explanation):
        return {"n_steps": item.options["n_steps"], "layer": "fake.layer"}

    def record_extras(self, item, explanation):
        return {"kept_for_the_record": [1, 2]} if item.options["html"] else None

    def input_content_type(self, item):
        return "text/plain; charset=utf-8"


class WatchedTrail(AuditTrail):
    """A real trail that notes, in ``events``, when each batch's records were committed."""

    events: list

    def record(self, entries):
        ids = super().record(entries)
        self.events.append(("recorded", len(entries)))
        return ids


def recording_flow(tmp_path, audit=None, explain=None, cache_mb=0):
    path = tmp_path / "audit.db"
    audit = {"record": "all", "sink": f"sqlite://{path}", **(audit or {})}
    settings = load_settings("text", {"explain": {"cache_mb": cache_mb, "audit": audit, **(explain or {})}}, "m", {})
    s = settings.explain
    tokens = ExplainTokens.load(parse_token_specs({"team-a": {"env": "A"}, "team-b": {"env": "B"}}), None, None,
                                {"A": "ay-secret", "B": "bee-secret"})
    gate = ExplanationGate(s.enabled, s.policy, s.priority_header, s.priority_values, s.on_denied, s.max_per_batch,
                           tokens, s.routes)
    trail = WatchedTrail.open(s.audit, model_name="m", model_version="1.0+abc", mar_sha256="ab" * 32)
    trail.events = []
    runner = RecordingRunner()
    flow = ExplainFlow(runner, settings, gate, ExplanationCache(int(cache_mb * 2**20), 100), metrics=Counting(),
                       model_name="m", model_version="1.0", cache_version="1.0+abc", trail=trail)
    return flow, runner, trail, f"sqlite://{path}"


def stored(url):
    store = open_store(url, create=False)
    try:
        bodies = {r.id: json.loads(r.body) for r in store.records(Filters())}
        report, _ = store.verify()
    finally:
        store.close()
    assert report.ok, report.breaks
    return bodies


def run(flow, batch, **kwargs):
    flow.run(batch, **kwargs)
    return [(row.answer.status, json.loads(row.answer.body)) for row in batch]


TEAM_A = {**EXPLAIN, "headers": {"x-explain-token": "ay-secret"}}
TEAM_B = {**EXPLAIN, "headers": {"x-explain-token": "bee-secret", "x-priority": "Audit"}}


def test_every_served_explanation_has_its_record_and_the_answer_its_id(tmp_path):
    flow, runner, trail, url = recording_flow(tmp_path, cache_mb=1)
    out = run(flow, rows(({"data": "a one", "n_steps": 8}, TEAM_A), ({"data": "b two", "method": "grad_x_input"}, TEAM_B),
                         ("c three", {}), ({"data": "a one"}, {**EXPLAIN, "headers": {"x-explain-token": "wrong"}})))
    assert [status for status, _ in out] == [200, 200, 200, 403]
    assert "explanation" not in out[2][1]  # a prediction: the stock body, nothing recorded
    records = stored(url)
    ids = [out[0][1]["explanation"]["explanation_id"], out[1][1]["explanation"]["explanation_id"]]
    assert sorted(records) == sorted(ids) and trail.events == [("recorded", 2)]  # one transaction for the batch
    computed, fused = records[ids[0]], records[ids[1]]
    answered = {k: v for k, v in out[0][1]["explanation"].items() if k != "explanation_id"}
    assert computed["explanation"] == answered and computed["predictions"] == out[0][1]["predictions"]
    assert computed["target"] == {"index": 0} and computed["method"] == "layer_ig" and computed["status"] == 200
    assert computed["caller"] == "team-a" and computed["priority"] is None and computed["route"] == "explanations"
    assert computed["input"] == {"sha256": hashlib.sha256(b"a one").hexdigest(), "size": 5, "kept": False,
                                 "content_type": "text/plain; charset=utf-8"}
    assert computed["parameters"] == {"n_steps": 8, "layer": "fake.layer"} and computed["request_id"] == "r"
    assert computed["model"] == {"name": "m", "version": "1.0+abc", "mar_sha256": "ab" * 32}
    assert fused["caller"] == "team-b" and fused["priority"] == "Audit" and fused["explanation"]["fused"] is True
    assert "ay-secret" not in json.dumps(records) and "bee-secret" not in json.dumps(records)

    # a cache hit is served, so it is recorded too: a record of its own, with the cached explanation
    again = run(flow, rows(({"data": "a one", "n_steps": 8}, TEAM_A),))[0][1]["explanation"]
    assert again["cached"] is True and again["explanation_id"] not in ids
    assert stored(url)[again["explanation_id"]]["explanation"]["cached"] is True
    assert flow.metrics.counts["AuditRecordsWritten"] == flow.metrics.counts["ExplanationsServed"] == 3


def test_what_only_the_record_keeps_survives_the_cache(tmp_path):
    """``record_extras`` (images: the heatmap of an overlay-only answer) goes to the record,
    never to the answer, also when the explanation comes from the cache."""
    flow, _, _, url = recording_flow(tmp_path, cache_mb=1)
    first, second = (run(flow, rows(({"data": "a x", "html": True}, TEAM_A),))[0][1]["explanation"] for _ in range(2))
    assert second["cached"] is True and "kept_for_the_record" not in first and "kept_for_the_record" not in second
    records = stored(url)
    for answered in (first, second):
        assert records[answered["explanation_id"]]["explanation"]["kept_for_the_record"] == [1, 2]


def test_record_priority_selects_by_the_priority_value(tmp_path):
    flow, _, _, url = recording_flow(tmp_path, audit={"record": "priority", "priority_values": ["audit"]})
    out = run(flow, rows(({"data": "a x"}, TEAM_A), ({"data": "a x", "priority": "AUDIT"}, TEAM_A),
                         ({"data": "b y"}, TEAM_B)))
    assert [status for status, _ in out] == [200, 200, 200]
    assert "explanation_id" not in out[0][1]["explanation"]  # served, not selected
    records = stored(url)
    assert sorted(records) == sorted(body["explanation"]["explanation_id"] for _, body in out[1:])
    assert sorted(r["priority"] for r in records.values()) == ["AUDIT", "Audit"]


def test_predictions_are_handed_over_before_the_write_and_explanations_after_it(tmp_path):
    """asyncCommunication's hand-over: the rows ready before the batch's explanation work go
    out first, without any row holding an explanation to record, also when the only
    explanation left is a cache hit (no explanation work: the write alone is left)."""
    flow, runner, trail, _ = recording_flow(tmp_path, cache_mb=1)

    batch = []

    def on_ready(ready):
        trail.events.append(("handed over", [next(k for k, row in enumerate(batch) if row is r) for r in ready]))

    batch[:] = rows(("a p", {}), ({"data": "b q"}, TEAM_A), ({"data": "c r", "method": "grad_x_input"}, TEAM_A),
                    ('{"data": ', {}))
    flow.run(batch, on_ready=on_ready)
    assert trail.events == [("handed over", [0, 3]), ("recorded", 2)]  # the fused map (2) waited for its record
    assert [row.answer.status for row in batch] == [200, 200, 200, 400]
    flow.run(rows(({"data": "b q"}, TEAM_A),))  # fills the cache
    trail.events.clear()
    batch[:] = rows(("a p", {}), ({"data": "b q"}, TEAM_A))
    flow.run(batch, on_ready=on_ready)
    assert trail.events == [("handed over", [0]), ("recorded", 1)] and runner.explained[-1] == ["b q"]
    assert json.loads(batch[1].answer.body)["explanation"]["cached"] is True


def hold_the_write_lock(url):
    lock = sqlite3.connect(url.removeprefix("sqlite://"), isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    return lock


def test_on_failure_fail_answers_503_and_the_predictions_go_on(tmp_path, caplog):
    flow, _, trail, url = recording_flow(tmp_path, audit={"timeout_ms": 50})
    lock = hold_the_write_lock(url)
    with caplog.at_level(logging.ERROR):
        out = run(flow, rows(({"data": "a x"}, TEAM_A), ("b y", {}), ({"data": "c z", "method": "grad_x_input"}, TEAM_A)))
    lock.execute("ROLLBACK")
    assert [(status, body.get("type")) for status, body in out] == [(503, "audit_unavailable"), (200, None),
                                                                    (503, "audit_unavailable")]
    assert "audit write failed: count=2" in caplog.text and trail.failed_records == 2
    assert flow.metrics.counts["AuditRecordsFailed"] == 2 and "ExplanationsServed" not in flow.metrics.counts
    out = run(flow, rows(({"data": "a x"}, TEAM_A),))  # the sink is back: recorded, and the chain stays whole
    assert out[0][0] == 200 and list(stored(url)) == [out[0][1]["explanation"]["explanation_id"]]


def test_on_failure_serve_answers_without_an_id_and_counts_the_loss(tmp_path, caplog):
    flow, _, trail, url = recording_flow(tmp_path, audit={"timeout_ms": 50, "on_failure": "serve"})
    lock = hold_the_write_lock(url)
    with caplog.at_level(logging.ERROR):
        out = run(flow, rows(({"data": "a x"}, TEAM_A), ("b y", {})))
    lock.execute("ROLLBACK")
    assert [status for status, _ in out] == [200, 200] and out[0][1]["explanation"]["target"] == {"index": 0}
    assert "explanation_id" not in out[0][1]["explanation"]
    assert "audit records lost: count=1" in caplog.text and trail.lost_records == 1
    assert flow.metrics.counts["AuditRecordsLost"] == flow.metrics.counts["ExplanationsServed"] == 1
    assert stored(url) == {}


def test_each_kserve_instance_is_its_own_record(tmp_path):
    flow, _, _, url = recording_flow(tmp_path)
    v1 = {"instances": ["a x", {"data": "b y", "target": "c"}, {"data": ""}]}
    v2 = {"inputs": [{"name": "in", "shape": [2], "datatype": "BYTES", "data": ["c z", "a w"]}]}
    kserve = {"explain": True, "plain": False, "headers": {"x-explain-token": "ay-secret"}}
    out = run(flow, rows((v1, kserve), (v2, kserve)))
    entries = out[0][1]["explanations"] + [json.loads(e) for e in out[1][1]["outputs"][0]["data"]]
    ids = [e["explanation"]["explanation_id"] for e in entries if "explanation" in e]
    assert len(ids) == len(set(ids)) == 4 and entries[2]["type"] == "empty_text"
    records = stored(url)
    assert sorted(records) == sorted(ids)
    assert [records[i]["route"] for i in ids] == ["kserve_v1", "kserve_v1", "kserve_v2", "kserve_v2"]
    assert [records[i]["input"]["sha256"] for i in ids] == [hashlib.sha256(t).hexdigest()
                                                           for t in (b"a x", b"b y", b"c z", b"a w")]


def test_settings_read_explain_audit_with_its_environment_overrides(tmp_path):
    config = {"explain": {"audit": {"record": "priority", "sink": "sqlite:///var/a.db"}, "tokens": {"t": {"env": "T"}}}}
    env = {"TSEXPLAIN_M_AUDIT_SINK": f"sqlite://{tmp_path}/m.db", "TSEXPLAIN_AUDIT_ON_FAILURE": "serve",
           "TSEXPLAIN_AUDIT_SINK": "sqlite:///ignored.db", "TSEXPLAIN_M_AUDIT_KEEP_INPUT": "true"}
    audit = load_settings("text", config, "m", env).explain.audit
    assert audit == AuditSettings(record="priority", sink=f"sqlite://{tmp_path}/m.db", on_failure="serve",
                                  keep_input=True)
    assert load_settings("image", {}, "m", {}).explain.audit == AuditSettings()  # off by default
    assert load_settings("text", {}, "m", {"TSEXPLAIN_AUDIT_RECORD": "all", "TSEXPLAIN_AUDIT_SINK":
                                           "sqlite:///x/a.db"}).explain.audit.enabled
    from tsexplain.serving.errors import ConfigError
    for bad, message in [({"audit": {"record": "all"}}, "sink must be set"), ({"audit": "all"}, "must be a mapping"),
                         ({"audit": {"sinks": "x"}}, r"unknown setting\(s\) \['sinks'\] in 'explain.audit'"),
                         ({"tokens": {"a b": {"env": "X"}}}, "not a valid token name")]:
        with pytest.raises(ConfigError, match=message):
            load_settings("text", {"explain": bad}, "m", {})
