"""benchmarks/overhead.py: both handlers driven in one process, on two image models in a row."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def test_each_model_is_driven_with_its_own_stock_model_file(tmp_path):
    """The stock handler imports its model file as module ``model``: the second image model
    (ResNet-50 after the shapes ResNet-18) must build its own class, not the first one's."""
    from benchmarks import overhead

    if not (ROOT / "build" / "demo" / "shapes" / "weights.pt").exists():
        pytest.fail("the demo models are not trained: run ./run_tests.sh, which trains them first")
    out = tmp_path / "overhead.json"
    assert overhead.main(["--models", "shapes", "resnet50", "--batches", "2", "--reps", "1",
                          "--export", str(tmp_path / "export"), "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [(r["model"], r["batch"]) for r in results] == [("shapes", 2), ("resnet50", 2)]
    for row in results:
        assert row["same_top_class"] == [True, True]  # same weights, same preprocessing: same answer
        assert row["ours_ms"] > 0 and row["stock_ms"] > 0


def test_top_class_reads_each_answer_form():
    from benchmarks.overhead import top_class

    assert top_class(b'{"cat": 0.2, "dog": 0.8}') == "dog"
    assert top_class(b'{\n  "cat": 0.9,\n  "dog": 0.1\n}') == "cat"
    assert top_class(b"positive") == "positive"
