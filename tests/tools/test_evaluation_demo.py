"""Faithfulness of the explanations of the trained demo models, in process (tsexplain.tools.evaluate).

Thresholds, against what these seeds and sizes gave (2026-11-23, 2-core CPU; README "Evaluating
explanations"):
- Grad-CAM's pointing game >= 0.9 (measured 1.0), as in tests/tools/test_demo_quality.py.
- Deletion: on the images where deletion can tell (below), Grad-CAM's AUC is below the random-map
  baseline's by >= 0.05 on average, at least two standard errors above zero, and for >= 60% of
  them. The model gives a fully deleted (mean-colour) image one class, and which class it is
  depends on the training run's floating point (a "star" on the machine of 2026-11-23, a "square"
  on another of 2026-12-02): deleting the evidence of that class cannot lower its probability,
  whatever the map, so images whose explained class keeps >= 0.5 at full deletion (`deletion_end`)
  are left out. On 2026-12-02's model, 100 images: 79 informative, gap 0.174 (standard error 0.027),
  lower for 80%; over all 100 the gap was 0.077, and the first 20 (the 2026-11-23 setting) gave 0.027,
  below the old threshold of 0.05: why the test no longer averages over uninformative images.
- Insertion: Grad-CAM's AUC above the random baseline's by >= 0.15 (measured 0.918 vs 0.566).
- Text: cue hit@3 >= 0.9 (measured 0.967); deleting the top word (by signed attribution)
  drops the target probability by >= 0.3 more than deleting a random word (measured 0.687 vs
  0.054), and the deletion AUC is below the random one (0.464 vs 0.835).
"""
from pathlib import Path

import numpy as np
import pytest

from tsexplain.tools import eval_data
from tsexplain.tools.eval_backends import InProcessImage, InProcessText
from tsexplain.tools.evaluate import evaluate_images, evaluate_text

DEMO = Path(__file__).resolve().parents[2] / "build" / "demo"
SEED = 20261123


@pytest.fixture(scope="module")
def image_report():
    backend = InProcessImage(DEMO / "shapes")
    views = eval_data.synthetic_images(100, SEED, 64, backend.preprocessing)
    return evaluate_images(backend, "gradcam", views, seed=SEED, steps=8, random_maps=2)


def test_gradcam_points_at_the_shape(image_report):
    assert image_report["method"] == "gradcam"
    assert image_report["metrics"]["pointing_game"] >= 0.9


def test_gradcam_deletes_faster_than_random_maps(image_report):
    per = image_report["per_sample"]
    informative = [p for p in per if p["deletion_end"] < 0.5]  # deletion can lower the class's probability
    gaps = np.array([p["deletion_auc_random"] - p["deletion_auc"] for p in informative])
    wins = np.mean(gaps > 0)
    sem = gaps.std(ddof=1) / np.sqrt(len(gaps))
    print(f"deletion: {len(informative)} of {len(per)} images informative, gap {gaps.mean():.3f} "
          f"(standard error {sem:.3f}), wins {wins:.2f}")
    assert len(informative) >= len(per) / 2
    assert gaps.mean() >= 0.05 and gaps.mean() - 2 * sem > 0
    assert wins >= 0.6


def test_gradcam_inserts_faster_than_random_maps(image_report):
    m = image_report["metrics"]
    print(f"insertion AUC gradcam {m['insertion_auc']['mean']:.3f} random {m['insertion_auc_random']['mean']:.3f}")
    assert m["insertion_auc_gap"]["mean"] >= 0.15
    curves = image_report["curves"]
    # Both curves start from the same blurred image and end at the same original.
    assert curves["insertion"][0] == pytest.approx(curves["insertion_random"][0])
    assert curves["insertion"][-1] == pytest.approx(curves["insertion_random"][-1])


def test_layer_ig_cue_words_and_word_deletion():
    backend = InProcessText(DEMO / "reviews")
    samples = eval_data.synthetic_texts(30, SEED)
    report = evaluate_text(backend, "layer_ig", [s.text for s in samples], seed=SEED, k=3, max_words=3, repeats=2,
                           samples=samples)
    m = report["metrics"]
    print({k: v for k, v in m.items()})
    assert report["method"] == "layer_ig"
    assert m["cue_hit_at_3"] >= 0.9
    assert m["drop_at_1"]["mean"] - m["drop_at_1_random"]["mean"] >= 0.3
    assert m["deletion_auc"]["mean"] < m["deletion_auc_random"]["mean"]
