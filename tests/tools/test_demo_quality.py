"""The trained demo models on fresh held-out synthetic data: accuracy and explanation quality."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tsexplain.tools.evaluation import pointing_hit, top_k_hit
from tsexplain.attr.cam import GradCAM
from tsexplain.serving.images import Preprocessing
from tsexplain.attr.layers import get_layer
from tsexplain.serving.models import build_torchvision_classifier
from tsexplain.tools.synthetic import reviews, shapes

DEMO = Path(__file__).resolve().parents[2] / "build" / "demo"
HELD_OUT_SEED = 424242  # differs from the training and validation seeds


@pytest.fixture(scope="module")
def shapes_model():
    training = json.loads((DEMO / "shapes" / "training.json").read_text())
    model = build_torchvision_classifier(training["architecture"], training["num_classes"], str(DEMO / "shapes" / "weights.pt"))
    return model, training


def test_shapes_accuracy_and_pointing(shapes_model):
    model, training = shapes_model
    size = training["image_size"]
    samples = shapes.generate(300, HELD_OUT_SEED, size)
    prep = Preprocessing(size, size)
    inputs = torch.stack([prep(s.image) for s in samples])
    cam = GradCAM(model, get_layer(model, training["target_layer"]))
    correct = hits = 0
    for start in range(0, len(samples), 50):
        out = cam.attribute(inputs[start:start + 50])
        for sample, logits, heatmap in zip(samples[start:start + 50], out.logits, out.heatmaps):
            correct += int(logits.argmax()) == sample.label
            hits += pointing_hit(heatmap, sample.box, size, size)
    assert min(out.heatmaps.shape[1:]) >= 7
    accuracy, pointing = correct / len(samples), hits / len(samples)
    print(f"shapes held-out accuracy {accuracy:.3f}, Grad-CAM pointing {pointing:.3f}")
    assert accuracy >= 0.95
    assert pointing >= 0.90


def test_reviews_accuracy_and_cue_words_lead():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tsexplain.attr.text.lig import LayerIGTextExplainer

    model = AutoModelForSequenceClassification.from_pretrained(DEMO / "reviews", local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(DEMO / "reviews", local_files_only=True)
    samples = reviews.generate(200, HELD_OUT_SEED)
    with torch.inference_mode():
        enc = tokenizer([s.text for s in samples], padding=True, return_tensors="pt")
        predicted = model(**enc).logits.argmax(1).tolist()
    accuracy = sum(p == s.label for p, s in zip(predicted, samples)) / len(samples)
    explainer = LayerIGTextExplainer(model, tokenizer)
    results = explainer.explain([s.text for s in samples], predicted, top_k=3)
    hits = sum(top_k_hit([dataclasses.asdict(w) for w in r.words], s.sentiment_span, 3) for r, s in zip(results, samples))
    relative = sorted(r.convergence_delta["relative"] for r in results)
    print(f"reviews held-out accuracy {accuracy:.3f}, cue hit@3 {hits / len(samples):.3f}, "
          f"median relative delta {relative[len(relative) // 2]:.2e}")
    assert accuracy >= 0.95
    assert hits / len(samples) >= 0.90
    assert relative[int(0.95 * len(relative))] <= 0.05
