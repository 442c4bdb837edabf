"""ImageExplainer in process, from a MAR built on random weights the test makes."""
import base64
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from harness import EXPLAIN, InProcessHandler, build_image_mar, imports_from_mar_only, png, unpack

LABELS = ("cat", "dog", "owl")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("image_mar")
    mar = build_image_mar(tmp, "pets", labels=LABELS,
                          config={"handler": {"resize": 80, "crop": 64}, "explain": {"target_layer": "layer2"}})
    return unpack(mar, tmp / "unpacked")


@pytest.fixture(scope="module")
def handler(model_dir):
    return InProcessHandler(model_dir, "image_explainer", "ImageExplainer")


def picture(seed=0, size=(96, 72)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_predictions_like_the_stock_classifier(handler):
    [(status, body)] = handler([(png(picture()), {})])
    assert status == 200
    assert list(body) and set(body) <= set(LABELS)
    probs = list(body.values())
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-5  # 3 classes, top 3


def test_explanation_contract(handler):
    [(status, body)] = handler([(png(picture()), EXPLAIN)])
    assert status == 200
    predicted = body["predictions"][0]
    explanation = body["explanation"]
    assert explanation["method"] == "gradcam" and explanation["layer"] == "layer2"
    assert explanation["target"] == {"index": predicted["index"], "label": predicted["label"]}
    heatmap = np.array(explanation["heatmap"]["values"])
    assert explanation["heatmap"]["shape"] == [8, 8] == list(heatmap.shape)
    assert heatmap.min() >= 0 and heatmap.max() <= 1
    assert "overlay_png" not in explanation and explanation["elapsed_ms"] > 0


def test_heatmap_equals_core_gradcam_on_the_loaded_model(handler):
    """Same numbers as the core computed directly on the worker's model."""
    from tsexplain.attr.cam import GradCAM

    image = picture(3)
    [(_, body)] = handler([(json.dumps({"data": base64.b64encode(png(image)).decode(), "target": "owl"}).encode(), EXPLAIN)])
    inputs = handler.handler.runner.preprocessing(image)[None]
    expected = GradCAM(handler.handler.model, handler.handler.model.layer2).attribute(inputs, [2]).heatmaps[0]
    assert body["explanation"]["target"] == {"index": 2, "label": "owl"}
    np.testing.assert_allclose(body["explanation"]["heatmap"]["values"], expected.numpy(), atol=1e-3)


def test_input_size_heatmap_and_overlay(handler):
    """At the input size the map is normalised again (peak exactly 1, as at the feature size:
    bilinear upsampling lowers a peak that lies inside the grid), and the overlay, drawn at the
    original size, reaches the full heat colour there too."""
    image = picture(4, size=(150, 100))
    request = {"data": base64.b64encode(png(image)).decode(), "outputs": ["heatmap", "overlay_png"],
               "heatmap_size": "input", "target": 2}
    [(status, body)] = handler([(request, EXPLAIN)])
    [(_, feature)] = handler([({**request, "heatmap_size": "feature", "outputs": ["heatmap"]}, EXPLAIN)])
    assert status == 200
    assert body["explanation"]["heatmap"]["shape"] == [64, 64]
    values = np.array(body["explanation"]["heatmap"]["values"])
    cells = np.array(feature["explanation"]["heatmap"]["values"])
    peak = np.unravel_index(cells.argmax(), cells.shape)
    assert 0 < peak[0] < 7 and 0 < peak[1] < 7  # inside the grid: plain upsampling would not reach 1 here
    assert values.max() == 1.0 and values.min() == 0.0
    overlay = Image.open(io.BytesIO(base64.b64decode(body["explanation"]["overlay_png"])))
    assert overlay.format == "PNG" and overlay.size == image.size
    drawn, original = np.asarray(overlay.convert("RGB"), dtype=float), np.asarray(image, dtype=float)
    full_heat = 0.4 * original + 0.6 * np.array([255.0, 0.0, 0.0])  # overlay_alpha 0.6 of red at heat 1
    assert (np.abs(drawn - full_heat).max(axis=2) <= 2).any()


def test_each_request_answered_as_if_alone(handler):
    """A mixed batch: predictions, explanations with different targets, and bad requests."""
    a, b = png(picture(5)), png(picture(6))
    alone = [handler([req])[0] for req in [(a, {}), ({"data": base64.b64encode(b).decode(), "target": 0}, EXPLAIN)]]
    batch = handler([
        (a, {}),
        (b"definitely not an image", EXPLAIN),
        ({"data": base64.b64encode(b).decode(), "target": 0}, EXPLAIN),
        ({"data": base64.b64encode(b).decode(), "target": "unicorn"}, EXPLAIN),
        (b'{"data": ', {}),
    ])
    assert [status for status, _ in batch] == [200, 400, 200, 400, 400]
    assert batch[1][1]["type"] == "bad_image" and batch[3][1]["type"] == "unknown_target"
    assert batch[4][1]["type"] == "bad_json"
    assert all(set(body) == {"code", "type", "message"} for status, body in batch if status == 400)
    for (_, together), (_, single) in zip([batch[0], batch[2]], alone):
        assert together.keys() == single.keys()
    np.testing.assert_allclose(list(batch[0][1].values()), list(alone[0][1].values()), atol=1e-5)
    np.testing.assert_allclose(batch[2][1]["explanation"]["heatmap"]["values"],
                               alone[1][1]["explanation"]["heatmap"]["values"], atol=2e-3)


def test_explanation_leaves_nothing_behind(handler):
    model = handler.handler.model
    data = png(picture(7))
    before = handler([(data, {})])
    handler([(data, EXPLAIN)])
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()
    # The next prediction runs under inference mode and answers exactly as before.
    seen = []
    hook = model.fc.register_forward_hook(lambda m, a, out: seen.append((torch.is_inference_mode_enabled(), out.requires_grad)))
    try:
        after = handler([(data, {})])
    finally:
        hook.remove()
    assert seen == [(True, False)]
    assert after == before


def test_failed_explanation_answers_503_and_keeps_predictions(handler, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(handler.handler.runner.gradcam, "attribute", broken)
    out = handler([(png(picture(8)), EXPLAIN), (png(picture(8)), {})])
    assert out[0][0] == 503 and out[0][1]["type"] == "explanation_failed"
    assert out[1][0] == 200 and len(out[1][1]) == 3


def test_mar_is_self_contained_and_carries_no_tools(model_dir, tmp_path):
    """The unpacked MAR imports its handler, the glue, the serving code and the maths
    from itself alone; the tools (client, launcher, evaluation) stay out of it."""
    result = imports_from_mar_only(model_dir, ["image_explainer", "ts_glue", "tsexplain.serving.flow",
                                               "tsexplain.attr.cam"], tmp_path)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]
    names = {p.name for p in model_dir.iterdir()}
    assert {"image_explainer.py", "ts_glue.py", "tsexplain", "index_to_name.json", "pets.pt", "named_model.py"} <= names
    assert {p.name for p in (model_dir / "tsexplain").iterdir()} == {"__init__.py", "attr", "serving"}
