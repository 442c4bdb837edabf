"""The audit sink benchmark in --quick mode: every scenario ran, verified, nothing lost (no timing thresholds)."""
import json

from benchmarks import audit_sink


def test_quick_run_writes_verified_results(tmp_path):
    assert audit_sink.main(["--quick", "--out", str(tmp_path / "audit_sink")]) == 0
    result = json.loads((tmp_path / "audit_sink.json").read_text())
    assert [(r["kind"], r["writers"], r["batch"]) for r in result["scenarios"]] == [("shapes", 1, 1), ("text", 2, 4)]
    for row in result["scenarios"]:
        assert row["verified"] and row["lost"] == 0 and row["records"] > 0 and row["records_per_s"] > 0
        assert 0 < row["record_ms_p50"] <= row["record_ms_p99"]
    shapes, text = result["scenarios"]
    assert 1000 < shapes["body_bytes"] < 3000 and 8000 < text["body_bytes"] < 16000  # realistic sizes
    assert (tmp_path / "audit_sink.md").read_text().count("| yes |") == 2
