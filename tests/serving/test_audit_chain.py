"""Record bodies, hash chains and verify: recomputed independently, and tampered with
through the sqlite3 module as someone with the database file would."""
import dataclasses
import hashlib
import json
import sqlite3

import pytest

from audit_entries import image_entry, text_entry
from tsexplain.serving.audit import AuditSettings, AuditTrail, open_store
from tsexplain.serving.audit import store as store_module
from tsexplain.serving.audit.chain import GENESIS, heads_document


def open_trail(path, **settings):
    s = AuditSettings(record="all", sink=f"sqlite://{path}", **settings)
    return AuditTrail.open(s, model_name="shapes", model_version="1.0+abcd", mar_sha256="ab" * 32)


@pytest.fixture
def trail_path(tmp_path):
    return tmp_path / "trail" / "audit.db"


def rows(path, where=""):
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT id, writer, seq, body, prev_hash, hash FROM audit_records {where} "
                          "ORDER BY writer, seq").fetchall()


def tamper(path, sql, *params):
    db = sqlite3.connect(path)
    db.execute(sql, params)
    db.commit()
    db.close()


def verify(path, saved=None):
    store = open_store(f"sqlite://{path}", create=False)
    try:
        return store.verify(saved_heads=saved)
    finally:
        store.close()


def test_record_body_and_hashes_recomputed_independently(trail_path):
    trail = open_trail(trail_path)
    ids = trail.record([image_entry(0), text_entry(1, caller="team-b")])
    trail.record([image_entry(2)])
    trail.close()
    stored = rows(trail_path)
    assert [r[0] for r in stored[:2]] == ids and [r[2] for r in stored] == [0, 1, 2]
    prev = GENESIS
    for record_id, writer, seq, body, prev_hash, digest in stored:
        expected_body = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert body == expected_body  # canonical
        assert prev_hash == prev
        assert digest == hashlib.sha256(f"{prev}\n{body}".encode()).hexdigest()
        prev = digest
    image, text = json.loads(stored[0][3]), json.loads(stored[1][3])
    assert image["input"] == {"sha256": hashlib.sha256(b"image-0").hexdigest(), "size": 7,
                              "content_type": "image/png", "kept": False}
    assert "overlay_png" not in image["explanation"] and "html" not in text["explanation"]
    assert image["explanation"]["heatmap"]["shape"] == [7, 7] and image["caller"] == "team-a"
    assert image["model"] == {"name": "shapes", "version": "1.0+abcd", "mar_sha256": "ab" * 32}
    assert text["convergence_delta"] == {"absolute": 1e-5, "relative": "NaN"} and text["converged"] is True
    assert text["caller"] == "team-b" and text["route"] == "kserve_v2" and text["priority"] is None
    assert image["time"].endswith("Z") and len(image["time"]) == 27
    report, heads = verify(trail_path)
    assert report.ok and report.records == 3 and report.chains == 1
    assert heads_document(heads) == [{"writer": stored[0][1], "seq": 2, "hash": stored[2][5]}]


def test_input_kept_up_to_the_cap(trail_path):
    trail = open_trail(trail_path, keep_input=True, max_input_bytes=8)
    small, large = trail.record([image_entry(0, data=b"12345678"), image_entry(1, data=b"123456789")])
    store = open_store(f"sqlite://{trail_path}")
    a, b = store.get(small), store.get(large)
    assert a.input == b"12345678" and json.loads(a.body)["input"]["kept"] is True
    assert b.input is None and json.loads(b.body)["input"] == {
        "sha256": hashlib.sha256(b"123456789").hexdigest(), "size": 9, "content_type": "image/png",
        "kept": False, "over_cap": True}
    store.close()


def test_entries_that_are_not_json_data_fail_before_the_sink(trail_path):
    trail = open_trail(trail_path)
    with pytest.raises(TypeError, match="explanation"):
        trail.record([dataclasses.replace(image_entry(0), explanation={"values": object()})])
    assert trail.record([image_entry(1)])  # the chain goes on from where it was
    assert verify(trail_path)[0].ok


def written(trail_path, n=8, writers=1):
    for w in range(writers):
        trail = open_trail(trail_path)
        for k in range(n // 2):
            trail.record([image_entry(2 * k), image_entry(2 * k + 1)])
        trail.close()
    return rows(trail_path)


def only_break(path):
    report, _ = verify(path)
    assert len(report.breaks) == 1, report.breaks
    return report.breaks[0]


def test_verify_passes_then_names_an_edited_record(trail_path):
    stored = written(trail_path)
    assert verify(trail_path)[0].ok
    record_id = stored[5][0]
    tamper(trail_path, "UPDATE audit_records SET body = replace(body, '\"label\":\"star\"', '\"label\":\"cross\"') "
                       "WHERE id = ?", record_id)
    broken = only_break(trail_path)
    assert (broken.seq, broken.id, broken.writer) == (5, record_id, stored[5][1])
    assert "hash does not match its content" in broken.reason


def test_an_edited_finding_column_is_detected(trail_path):
    stored = written(trail_path)
    tamper(trail_path, "UPDATE audit_records SET caller = 'team-z' WHERE id = ?", stored[2][0])
    broken = only_break(trail_path)
    assert broken.seq == 2 and "column 'caller'" in broken.reason


def test_an_edit_with_its_hash_recomputed_breaks_the_next_link(trail_path):
    stored = written(trail_path)
    record_id, _, _, body, prev, _ = stored[3]
    body = body.replace('"probability":0.99', '"probability":0.5')
    tamper(trail_path, "UPDATE audit_records SET body = ?, hash = ? WHERE id = ?",
           body, hashlib.sha256(f"{prev}\n{body}".encode()).hexdigest(), record_id)
    broken = only_break(trail_path)
    assert broken.seq == 4 and broken.id == stored[4][0] and "prev_hash" in broken.reason


@pytest.mark.parametrize("seq,expected_seq,reason", [
    (3, 4, "seq 3..3 before it are missing"),
    (0, 1, "starts at seq 1, not at seq 0"),
    (7, 6, "records at the end were removed"),
])
def test_a_deleted_record_is_detected(trail_path, seq, expected_seq, reason):
    stored = written(trail_path)
    tamper(trail_path, "DELETE FROM audit_records WHERE id = ?", stored[seq][0])
    broken = only_break(trail_path)
    assert broken.seq == expected_seq and reason in broken.reason


def test_a_whole_chain_deleted_is_detected(trail_path):
    written(trail_path)
    tamper(trail_path, "DELETE FROM audit_records")
    broken = only_break(trail_path)
    assert broken.seq == 7 and broken.id is None and "has no records" in broken.reason


def test_reordered_records_are_detected(trail_path):
    stored = written(trail_path)
    a, b = stored[2][0], stored[5][0]
    tamper(trail_path, "UPDATE audit_records SET seq = -1 WHERE id = ?", a)
    tamper(trail_path, "UPDATE audit_records SET seq = 2 WHERE id = ?", b)
    tamper(trail_path, "UPDATE audit_records SET seq = 5 WHERE id = ?", a)
    broken = only_break(trail_path)
    assert broken.seq == 2 and broken.id == b and "column 'seq'" in broken.reason


def test_a_replaced_kept_input_is_detected(trail_path):
    trail = open_trail(trail_path, keep_input=True)
    (record_id,) = trail.record([image_entry(0, data=b"original")])
    tamper(trail_path, "UPDATE audit_records SET input = ? WHERE id = ?", b"forged", record_id)
    assert "kept input does not match" in only_break(trail_path).reason


def test_each_chain_verifies_on_its_own(trail_path):
    stored = written(trail_path, n=4, writers=3)
    assert len({r[1] for r in stored}) == 3 and verify(trail_path)[0].chains == 3
    tamper(trail_path, "UPDATE audit_records SET body = body || ' ' WHERE id = ?", stored[5][0])
    report, _ = verify(trail_path)
    assert report.records == 12 and len(report.breaks) == 1 and report.breaks[0].writer == stored[5][1]


def test_prune_keeps_the_chains_verifiable_and_tampering_detectable(trail_path, monkeypatch):
    monkeypatch.setattr(store_module, "PRUNE_CHUNK", 3)  # several transactions per chain
    trail = open_trail(trail_path)
    old = [trail.record([image_entry(k)])[0] for k in range(7)]
    new = [trail.record([image_entry(k)])[0] for k in range(7, 10)]
    store = open_store(f"sqlite://{trail_path}")
    cutoff = store.get(new[0]).time
    assert store.prune(cutoff, dry_run=True).records == 7 and len(rows(trail_path)) == 10
    result = store.prune(cutoff)
    assert (result.records, result.writers) == (7, 1)
    assert [r[0] for r in rows(trail_path)] == new and all(store.get(i) is None for i in old)
    report, _ = store.verify()
    assert report.ok and report.records == 3
    with sqlite3.connect(trail_path) as db:
        assert db.execute("SELECT seq, pruned FROM audit_anchors").fetchall() == [(7, 7)]
    assert store.prune(cutoff).records == 0  # nothing more to do
    trail.record([image_entry(11)])  # the writer goes on after a prune
    assert store.verify()[0].ok
    tamper(trail_path, "DELETE FROM audit_records WHERE id = ?", new[0])
    broken = store.verify()[0].breaks[0]
    assert broken.seq == 8 and "its prune anchor" in broken.reason
    store.close()


def test_a_chain_pruned_whole_goes_on(trail_path):
    trail = open_trail(trail_path)
    trail.record([image_entry(0), image_entry(1)])
    store = open_store(f"sqlite://{trail_path}")
    assert store.prune("9999-01-01T00:00:00.000000Z").records == 2
    assert store.verify()[0].ok and rows(trail_path) == []
    trail.record([image_entry(2)])
    report, _ = store.verify()
    assert report.ok and rows(trail_path)[0][2] == 2
    store.close()


def test_saved_heads_catch_a_consistent_truncation(trail_path, tmp_path):
    stored = written(trail_path)
    store = open_store(f"sqlite://{trail_path}")
    saved = heads_document(store.verify()[1])
    assert store.verify(saved_heads=saved)[0].ok
    # someone removes the last record and moves the head back, consistently
    tamper(trail_path, "DELETE FROM audit_records WHERE id = ?", stored[7][0])
    tamper(trail_path, "UPDATE audit_writers SET head_seq = 6, head_hash = ?", stored[6][5])
    assert store.verify()[0].ok  # invisible from inside the database
    report, _ = store.verify(saved_heads=saved)
    assert len(report.breaks) == 1 and report.breaks[0].seq == 7 and "missing" in report.breaks[0].reason
    store.close()


def test_saved_heads_accept_a_legitimate_prune(trail_path):
    trail = open_trail(trail_path)
    trail.record([image_entry(0), image_entry(1)])
    store = open_store(f"sqlite://{trail_path}")
    saved = heads_document(store.verify()[1])
    trail.record([image_entry(2)])
    store.prune("9999-01-01T00:00:00.000000Z")
    assert store.verify(saved_heads=saved)[0].ok
    store.close()
