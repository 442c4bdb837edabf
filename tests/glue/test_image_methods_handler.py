"""ImageExplainer's methods per request: dispatch, contrast, limits, errors and metrics."""
import base64

import numpy as np
import pytest
import torch
from PIL import Image

from harness import EXPLAIN, InProcessHandler, build_image_mar, png, unpack
from tsexplain.attr.cam import GradCAM
from tsexplain.attr.image_ig import ImageIG, sum_pool

LABELS = ("cat", "dog", "owl", "fox")
ALL_METHODS = ["gradcam", "gradcam++", "layercam", "layer_ig", "integrated_gradients"]


@pytest.fixture(scope="module")
def handler(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("methods_mar")
    config = {"handler": {"resize": 40, "crop": 32},
              "explain": {"target_layer": "layer2", "methods": ALL_METHODS, "n_steps": 8, "max_n_steps": 16,
                          "internal_batch_size": 8}}
    mar = build_image_mar(tmp, "pets4", labels=LABELS, config=config)
    return InProcessHandler(unpack(mar, tmp / "unpacked"), "image_explainer", "ImageExplainer")


@pytest.fixture(scope="module")
def default_handler(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("default_mar")
    # 64 pixels: ResNet's layer4 (the default layer) is a 2x2 grid; at 32 it is 1x1 and the build refuses it
    mar = build_image_mar(tmp, "pets_default", labels=LABELS, config={"handler": {"resize": 72, "crop": 64}})
    return InProcessHandler(unpack(mar, tmp / "unpacked"), "image_explainer", "ImageExplainer")


def picture(seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8))


def request(seed=0, **fields):
    return {"data": base64.b64encode(png(picture(seed))).decode(), **fields}


def served_methods(h):
    return [kwargs_dims[-1][0].value for name, kwargs_dims, _ in h.metrics.calls
            if name == "add_counter" and kwargs_dims[0] == "ExplanationsServed"]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_each_method_answers(handler, method):
    [(status, body)] = handler([(request(1, method=method, target="owl", contrast="dog"), EXPLAIN)])
    assert status == 200, body
    explanation = body["explanation"]
    assert explanation["method"] == method
    assert explanation["target"] == {"index": 2, "label": "owl"}
    assert explanation["contrast"] == {"index": 1, "label": "dog"}
    assert explanation["layer"] == ("input" if method == "integrated_gradients" else "layer2")
    heatmap = explanation["heatmap"]
    assert heatmap["shape"] == [4, 4] == list(np.array(heatmap["values"]).shape)
    values = np.array(heatmap["values"])
    if method.startswith("gradcam") or method == "layercam":
        assert values.min() >= 0 and values.max() <= 1 and "convergence_delta" not in explanation
    else:
        assert values.min() >= -1 and values.max() <= 1 and np.abs(values).max() == 1
        assert explanation["n_steps"] == 8 and heatmap["scale"] > 0
        assert set(explanation["convergence_delta"]) == {"absolute", "relative"}
    assert served_methods(handler)[-1] == method  # the metric carries the method actually used


def test_layer_ig_and_ig_equal_the_core_on_the_loaded_model(handler):
    model = handler.handler.model
    image = picture(2)
    inputs = handler.handler.runner.preprocessing(image)[None]
    for method, layer, n_steps in [("layer_ig", model.layer2, 8), ("integrated_gradients", None, 12)]:
        [(status, body)] = handler([(request(2, method=method, target=3, n_steps=n_steps), EXPLAIN)])
        assert status == 200
        maps = ImageIG(model, layer).attribute(inputs, [3], n_steps=n_steps).maps
        if layer is None:
            maps = sum_pool(maps, 4, 4)
        heatmap = body["explanation"]["heatmap"]
        np.testing.assert_allclose(np.array(heatmap["values"]) * heatmap["scale"], maps[0].numpy(),
                                   atol=2e-3 * heatmap["scale"])
        assert body["explanation"]["n_steps"] == n_steps


def test_input_size_ig_map_is_full_resolution(handler):
    [(status, body)] = handler([(request(3, method="integrated_gradients", heatmap_size="input",
                                         outputs=["heatmap", "overlay_png"]), EXPLAIN)])
    assert status == 200 and body["explanation"]["heatmap"]["shape"] == [32, 32]
    assert body["explanation"]["overlay_png"]


@pytest.mark.parametrize("method", ["gradcam", "layercam", "layer_ig"])
def test_input_size_maps_of_grid_methods_peak_at_one(handler, method):
    """Upsampled from the 4x4 grid and normalised again: the peak is exactly 1 (CAM maps) or
    ±1 (layer IG, whose ``scale`` is then that of the interpolated cells)."""
    [(status, body)] = handler([(request(12, method=method, target="owl", heatmap_size="input"), EXPLAIN)])
    [(_, cells)] = handler([(request(12, method=method, target="owl"), EXPLAIN)])
    assert status == 200
    values = np.array(body["explanation"]["heatmap"]["values"])
    assert values.shape == (32, 32) and np.abs(values).max() == 1.0
    if method != "layer_ig":
        assert values.min() == 0.0
    else:  # the interpolated cells never exceed the cells themselves
        assert body["explanation"]["heatmap"]["scale"] <= cells["explanation"]["heatmap"]["scale"] * (1 + 1e-5)


def test_mixed_batch_answers_each_as_if_alone_with_one_cam_pass(handler):
    reqs = [
        (png(picture(4)), {}),
        (request(5, method="gradcam++", target=0), EXPLAIN),
        (request(6, method="layer_ig", target="dog", contrast="fox"), EXPLAIN),
        (request(7, method="layercam"), EXPLAIN),
        (request(8, method="integrated_gradients", target="cat"), EXPLAIN),
        (request(9, method="gradcam", contrast="cat", target="cat"), EXPLAIN),
        (request(9, method="scorecam"), EXPLAIN),
    ]
    alone = [handler([r])[0] for r in reqs]
    fc_calls = []
    hook = handler.handler.model.fc.register_forward_hook(lambda *a: fc_calls.append(a[1][0].shape[0]))
    try:
        together = handler(reqs)
    finally:
        hook.remove()
    assert [s for s, _ in together] == [s for s, _ in alone] == [200, 200, 200, 200, 200, 400, 400]
    assert together[5][1]["type"] == "bad_contrast" and together[6][1]["type"] == "unknown_method"
    for (_, a), (_, b) in zip(alone[:5], together[:5]):
        if "explanation" in a:
            assert a["explanation"]["method"] == b["explanation"]["method"]
            assert a["explanation"]["target"] == b["explanation"]["target"]
            np.testing.assert_allclose(np.array(a["explanation"]["heatmap"]["values"]),
                                       np.array(b["explanation"]["heatmap"]["values"]), atol=3e-3)
    # The five valid requests: one fused forward for the predictions and both CAM maps
    # (no separate prediction pass); IG's own passes carry one request's rows and steps.
    assert fc_calls[0] == 5 and fc_calls.count(5) == 1
    assert set(fc_calls[1:]) <= {1, 8}  # n_steps 8 in chunks of internal_batch_size 8; 1 row for the delta


def test_cam_maps_of_a_mixed_batch_equal_the_core(handler):
    model = handler.handler.model
    inputs = torch.stack([handler.handler.runner.preprocessing(picture(s)) for s in (10, 11)])
    [(_, a), (_, b)] = handler([(request(10, method="gradcam++", target=1), EXPLAIN),
                                (request(11, method="layercam", target=2, contrast=0), EXPLAIN)])
    core = GradCAM(model, model.layer2).attribute(inputs, [1, 2], contrast=[None, 0], methods=["gradcam++", "layercam"])
    np.testing.assert_allclose(a["explanation"]["heatmap"]["values"], core.heatmaps[0].numpy(), atol=1e-3)
    np.testing.assert_allclose(b["explanation"]["heatmap"]["values"], core.heatmaps[1].numpy(), atol=1e-3)


def test_contrast_equal_to_the_predicted_class_is_a_400(handler):
    [(_, plain)] = handler([(request(12), EXPLAIN)])
    predicted = plain["explanation"]["target"]["index"]
    for method in ("gradcam", "layer_ig"):
        [(status, body), (other, _)] = handler([(request(12, method=method, contrast=predicted), EXPLAIN),
                                                (png(picture(12)), {})])
        assert status == 400 and body["type"] == "bad_contrast" and other == 200


@pytest.mark.parametrize("fields,status,kind", [
    ({"method": "scorecam"}, 400, "unknown_method"),
    ({"method": 3}, 400, "bad_method"),
    ({"contrast": "unicorn"}, 400, "unknown_contrast"),
    ({"contrast": 9}, 400, "unknown_contrast"),
    ({"contrast": True}, 400, "bad_contrast"),
    ({"contrast": "owl", "target": 2}, 400, "bad_contrast"),
    ({"method": "layer_ig", "n_steps": 17}, 400, "bad_n_steps"),
    ({"method": "layer_ig", "n_steps": 0}, 400, "bad_n_steps"),
    ({"method": "gradcam", "n_steps": 4}, 400, "bad_n_steps"),
])
def test_bad_method_fields(handler, fields, status, kind):
    [(got, body)] = handler([(request(13, **fields), EXPLAIN)])
    assert (got, body["type"]) == (status, kind)


def test_default_config_allows_the_single_pass_methods_only(default_handler):
    assert default_handler.handler.settings.explain.methods == ["gradcam", "gradcam++", "layercam"]
    [(status, body)] = default_handler([(png(picture(14)), EXPLAIN)])
    assert body["explanation"]["contrast"] is None
    [(status, body)] = default_handler([(request(14, method="integrated_gradients"), EXPLAIN)])
    assert status == 403 and body["type"] == "method_not_allowed"
    [(status, body)] = default_handler([(request(14, method="layercam"), EXPLAIN)])
    assert status == 200 and body["explanation"]["method"] == "layercam"
    [(status, body)] = default_handler([(png(picture(14)), EXPLAIN)])
    assert status == 200 and body["explanation"]["method"] == "gradcam"


def test_failed_ig_keeps_the_other_answers(handler, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(handler.handler.runner.integrated["layer_ig"], "attribute", broken)
    out = handler([(request(15, method="layer_ig"), EXPLAIN), (request(15, method="gradcam"), EXPLAIN),
                   (png(picture(15)), {})])
    assert [s for s, _ in out] == [503, 200, 200]
    assert out[0][1]["type"] == "explanation_failed"
    failed = [dims[-1][0].value for name, dims, _ in handler.metrics.calls
              if name == "add_counter" and dims[0] == "ExplanationsFailed"]
    assert failed[-1] == "layer_ig"


def test_nothing_left_behind_after_ig(handler):
    model = handler.handler.model
    handler([(request(16, method="layer_ig"), EXPLAIN), (request(16, method="integrated_gradients"), EXPLAIN)])
    assert all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()

