"""tsexplain-eval against a real TorchServe serving the demo MARs: synthetic data, and a user's
folder of images and text file, whose answers must equal the same MARs' in process."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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
              "--model-config", str(server.model_store / "shapes.mar"), "--n", "8", "--steps", "4", "--random-maps", "1",
              "--out", str(out)]
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


def test_a_users_images_and_texts_against_the_server(server, demo_store, tmp_path):
    from tsexplain.serving.images import Preprocessing
    from tsexplain.tools import eval_data
    from tsexplain.tools.eval_backends import ServedImage, ServedText
    from tsexplain.tools.eval_mar import MarImage, MarText
    from tsexplain.tools.synthetic import shapes

    photos = tmp_path / "photos"
    photos.mkdir()
    for k, sample in enumerate(shapes.generate(3, 99, 96)):
        sample.image.convert("RGB").resize((80 + 30 * k, 120 - 20 * k)).save(photos / f"p{k}.jpg")
    key = server.key("inference")
    common = ["--url", server.inference_url, "--model", "shapes", "--key", key, "--priority", "high",
              "--explain-token", SECRET, "--images", str(photos), "--steps", "2", "--random-maps", "1"]
    wrong = cli("image", *common, "--resize", "128", "--crop", "64", "--out", str(tmp_path / "never"))
    assert wrong.returncode == 2 and "resize step is not resize=128" in wrong.stderr
    done = cli("image", *common, "--resize", "64", "--crop", "64", "--out", str(tmp_path / "image"))
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "image" / "report.json").read_text())
    assert report["geometry"]["crop"] == "checked" and "pointing_game" not in report["metrics"]

    # The same frames answered through TorchServe and by the MAR in process: equal probabilities and maps.
    views, _ = eval_data.user_images(photos, 3, 0, Preprocessing(64, 64))
    frames = eval_data.frames(views)
    served = ServedImage(server.inference_url, "shapes", key, SECRET, "high", preprocessing=Preprocessing(64, 64))
    local = MarImage(demo_store / "shapes.mar")
    try:
        assert np.allclose(served.predict_proba(frames), local.predict_proba(frames), atol=1e-5)
        for a, b in zip(served.explain(frames, "gradcam"), local.explain(frames, "gradcam")):
            assert a.target == b.target and np.allclose(a.heatmap, b.heatmap, atol=1.001e-3)  # 3 decimals
    finally:
        local.close()

    texts = tmp_path / "texts.txt"
    texts.write_text("what a lovely little place\nthe film dragged on and on\n", encoding="utf-8")
    done = cli("text", "--url", server.inference_url, "--model", "reviews", "--key", key, "--texts", str(texts),
               "--max-words", "2", "--random-repeats", "1", "--out", str(tmp_path / "text"))
    assert done.returncode == 0, done.stderr
    lines = texts.read_text().splitlines()
    served_text, local_text = ServedText(server.inference_url, "reviews", key), MarText(demo_store / "reviews.mar")
    try:
        assert np.allclose(served_text.predict_proba(lines), local_text.predict_proba(lines), atol=1e-5)
    finally:
        local_text.close()
