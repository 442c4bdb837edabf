"""The benchmark harness in --quick mode on the demo models: outputs exist and hold sane values.

Checks structure and values that do not depend on timing (no latency thresholds: speed is
reported by the benchmark, not asserted by tests).
"""
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    from benchmarks import run

    demo = ROOT / "build" / "demo"
    if not (demo / "shapes" / "weights.pt").exists() or not (demo / "reviews" / "config.json").exists():
        pytest.fail("the demo models are not trained: run ./run_tests.sh, which trains them first")
    out = tmp_path_factory.mktemp("bench")
    results = run.main(["--quick", "--out", str(out), "--workdir", str(out / "work")])
    return out, results


def test_outputs_written(quick):
    out, results = quick
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    with Image.open(out / "results.png") as chart:
        assert chart.format == "PNG" and chart.width >= 800 and chart.height >= 300
    text = (out / "results.md").read_text()
    for heading in ("**Targets**", "**Sequential, batch 1**", "**Concurrent /predictions throughput**",
                    "**/predictions under load, ours**", "**LIG convergence**",
                    "**/predictions under load, closed loop**",
                    "**/predictions under load, open loop**"):
        assert heading in text
    assert "| shapes |" in text and "| reviews |" in text


def test_every_scenario_measured_without_errors(quick):
    _, results = quick
    assert set(results["models"]) == {"shapes", "reviews"}
    assert results["environment"]["device"] in ("cpu",) or results["environment"]["device"].startswith("cuda")
    for model in results["models"].values():
        for key in ("stock/predictions", "ours/predictions", "stock/explanations", "ours/explanations"):
            s = model["sequential"][key]
            assert s["n"] >= 1 and s["errors"] == 0
            assert 0 < s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"] and s["bytes_max"] > 0
        tp = model["throughput"]
        assert tp["stock"]["errors"] == 0 and tp["ours"]["errors"] == 0
        assert tp["stock"]["rps"] > 0 and tp["ours"]["rps"] > 0
        assert len(tp["cycle_ratios"]) == 1 and tp["cycle_ratios"][0] > 0  # the quick profile: one ABBA cycle
        assert tp["warmup_cycle_ratios"] == [] and [p[2] for p in tp["phase_rps"]] == [True] * 4
        load = model["under_load"]
        assert load["open_loop"]["rate_rps"] > 0
        for loop in (load, load["open_loop"]):
            assert loop["predictions_only"]["n"] >= 1 and loop["predictions_only"]["errors"] == 0
            for phase in ("with_explanations", "with_explanations_async"):
                mixed = loop[phase]
                assert mixed["n"] >= 1 and mixed["explained"]["n"] >= 1
                assert mixed["errors"] == 0 and mixed["explanations_not_computed"] == 0
                # every request's batch was found in the workers' log
                assert mixed["batches"]["complete"] and mixed["batches"]["requests"] >= mixed["n"]
                assert 0 <= mixed["batches"]["answered_early"] <= mixed["batches"]["not_explained_in_mixed"]
            # served synchronously, a batch is answered whole: nothing goes before its explanation work
            assert loop["with_explanations"]["batches"]["answered_early"] == 0


def test_answers_and_sizes(quick):
    _, results = quick
    shapes, reviews = results["models"]["shapes"], results["models"]["reviews"]
    # Grad-CAM answers are small; the stock IG answer is the full input-sized attribution.
    assert shapes["sequential"]["ours/explanations"]["bytes_max"] <= 20_000
    assert shapes["sequential"]["stock/explanations"]["bytes_mean"] > 64 * 64 * 3 * 5
    conv = reviews["sequential"]["convergence"]
    assert conv["n"] >= 1 and 0 <= conv["share_le_0.05"] <= 1 and conv["median_relative_delta"] >= 0
    for model in (shapes, reviews):  # predictions beside explanations: same labels, in the same order
        for loop in (model["under_load"], model["under_load"]["open_loop"]):
            assert loop["with_explanations"]["labels_differ"] == 0
            assert loop["with_explanations_async"]["labels_differ"] == 0
            assert loop["answers_unchanged"] is True
            assert loop["answers_unchanged_async"] is True


def test_targets_rows(quick):
    _, results = quick
    rows = results["targets"]
    assert {r["model"] for r in rows} == {"shapes", "reviews"}
    assert len([r for r in rows if r["model"] == "shapes"]) == 7
    assert len([r for r in rows if r["model"] == "reviews"]) == 6
    for r in rows:
        assert isinstance(r["met"], bool) and r["comparison"] in ("<=", ">=") and r["value"] is not None
        assert r["met"] == (r["value"] <= r["threshold"] if r["comparison"] == "<=" else r["value"] >= r["threshold"])


def test_audit_cost_quick(tmp_path):
    """benchmarks.audit_cost on the demo model: every phase measured, every recorded explanation in
    its trail, which verifies (no timing thresholds)."""
    from benchmarks import audit_cost

    assert audit_cost.main(["--model", "shapes", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "audit_cost.json").read_text())
    for route in ("explanations", "predictions"):
        for side in ("off", "on"):
            assert result[route][side]["n"] == 6 and 0 < result[route][side]["p50_ms"] <= result[route][side]["p90_ms"]
        assert result[route]["ratio_of_medians"] > 0 and len(result[route]["load_1min"]) == 2
    assert result["trail"] == {"records": 7, "verified": True, "answered_ids_missing": 0}  # 1 warm-up + 6
    assert result["writes"]["batches"] == 7 and result["writes"]["lost"] == 0 and result["writes"]["write_ms_p50"] > 0
    for phase in result["throughput"].values():
        assert phase["errors"] == 0 and phase["off_rps"] > 0 and phase["on_rps"] > 0
    assert result["throughput"]["one_in_ten_explained"]["explanations"] > 0
    assert "| /explanations | 6 |" in (tmp_path / "audit_cost.md").read_text()
