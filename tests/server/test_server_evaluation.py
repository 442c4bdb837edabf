"""tsexplain-eval against a real TorchServe serving the demo MARs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]
SECRET = "eval-secret-7f3a"


@pytest.fixture(scope="module")
def server(demo_store, tmp_path_factory):
    from tsexplain.tools.launcher import TorchServe

    workdir = tmp_path_factory.mktemp("torchserve-eval")
    # shapes explanations need the X-Explain-Token secret, and only for priority traffic
    env = {"EVAL_EXPLAIN_SECRET": SECRET, "TSEXPLAIN_SHAPES_TOKEN_ENV": "EVAL_EXPLAIN_SECRET",
           "TSEXPLAIN_SHAPES_POLICY": "priority"}
    with TorchServe(demo_store, {"shapes": "shapes.mar", "reviews": "reviews.mar"}, workdir, env=env) as ts:
        yield ts


def cli(*args):
    return subprocess.run([sys.executable, "-m", "tsexplain.tools.evaluate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_image_evaluation_against_the_server(server, tmp_path):
    out = tmp_path / "image"
    key_file = str(server.workdir / "key_file.json")
    common = ["image", "--url", server.inference_url, "--model", "shapes", "--key-file", key_file,
              "--n", "8", "--steps", "4", "--random-maps", "1", "--out", str(out)]
    denied = cli(*common, "--priority", "audit")  # no token
    assert denied.returncode == 2 and "403" in denied.stderr and not out.exists()

    done = cli(*common, "--priority", "high", "--explain-token", SECRET)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "gradcam" and report["backend"].startswith("served:")
    m = report["metrics"]
    assert m["pointing_game"] >= 0.75 and m["accuracy"] >= 0.75
    assert m["insertion_auc"]["mean"] > m["insertion_auc_random"]["mean"]
    assert len(report["curves"]["deletion"]) == 5 and len(report["per_sample"]) == 8
    printed = done.stdout
    assert "deletion AUC" in printed and "insertion AUC" in printed and "pointing game" in printed
    assert f"{m['pointing_game']:.3f}" in printed and f"{m['deletion_auc']['mean']:.3f}" in printed
    assert "| deletion AUC |" in (out / "report.md").read_text()
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_text_evaluation_against_the_server(server, tmp_path):
    out = tmp_path / "text"
    done = cli("text", "--url", server.inference_url, "--model", "reviews", "--key",
               server.key("inference"), "--n", "8", "--max-words", "2", "--random-repeats", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    m = report["metrics"]
    assert report["method"] == "layer_ig"
    assert m["cue_hit_at_3"] >= 0.75
    assert m["drop_at_1"]["mean"] > m["drop_at_1_random"]["mean"]
    assert "cue hit@3" in done.stdout and f"{m['cue_hit_at_3']:.3f}" in done.stdout
    assert (out / "report.md").exists() and (out / "curves.png").stat().st_size > 1000

    wrong_key = cli("text", "--url", server.inference_url, "--model", "reviews", "--key", "wrong", "--n", "2",
                    "--out", str(tmp_path / "never"))
    assert wrong_key.returncode == 2 and "error" in wrong_key.stderr
