"""ImageExplainer on the kinds of MAR TorchServe users make by hand: a model file with its
state dict, and TorchScript. Predictions equal TorchServe's stock ``image_classifier`` on
the same MAR; a TorchScript model serves input IG (equal to captum on the scripted
model) and answers 422 ``method_unsupported`` to the methods that need hooks."""
import base64
import json

import numpy as np
import pytest
import torch
import yaml
from captum.attr import IntegratedGradients
from PIL import Image
from torchvision import transforms
from ts.context import Context, RequestProcessor
from ts.torch_handler.image_classifier import ImageClassifier

import build_mar
from harness import EXPLAIN, InProcessHandler, RecordingMetrics, png, unpack
from tiny_vision import LABELS, scripted, tiny_cnn, write_labels
from tsexplain.attr.image_ig import sum_pool


def by_hand(tmp, name: str, config: dict, **files) -> InProcessHandler:
    """A MAR made as a pipeline makes it: torch-model-archiver, no build_mar.sh checks."""
    extra = tmp / f"{name}-extra"
    build_mar.write_serving_code(extra)
    write_labels(extra / "index_to_name.json")
    config_file = tmp / f"{name}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    mar = build_mar.archive(name, "1.0", "image_explainer.py", extra, config_file, tmp / "store", **files)
    return unpack(mar, tmp / name)


def stock(model_dir) -> ImageClassifier:
    """TorchServe's stock image classifier on the same unpacked MAR."""
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    config = yaml.safe_load((model_dir / manifest["model"]["configFile"]).read_text())
    context = Context(manifest["model"]["modelName"], str(model_dir), manifest, 1, None, "0.12.0",
                      metrics=RecordingMetrics(), model_yaml_config=config)
    handler = ImageClassifier()
    handler.topk = len(LABELS)  # the stock top 5 fails on a 3-class model ("selected index k out of range")
    handler.initialize(context)
    return handler, context


def picture(seed=0, size=(300, 260)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kinds")
    source, weights, model = tiny_cnn(tmp / "user")
    return tmp, source, weights, model


@pytest.fixture(scope="module")
def torchscript(network):
    tmp, _, _, model = network
    path = scripted(model, tmp / "tinynet.pt")
    config = {"explain": {"methods": ["gradcam", "integrated_gradients", "layer_ig"], "n_steps": 8}}
    model_dir = by_hand(tmp, "ts", config, serialized_file=path)
    return InProcessHandler(model_dir, "image_explainer", "ImageExplainer"), model_dir


@pytest.mark.parametrize("kind", ["model_file", "torchscript"])
def test_predictions_equal_the_stock_image_classifier(network, torchscript, kind):
    tmp, source, weights, _ = network
    if kind == "torchscript":
        ours, model_dir = torchscript
    else:
        model_dir = by_hand(tmp, "mf", {}, model_file=source, serialized_file=weights)
        ours = InProcessHandler(model_dir, "image_explainer", "ImageExplainer")
    handler, context = stock(model_dir)
    image = png(picture(1))
    context.request_processor = [RequestProcessor({})]
    [expected] = handler.handle([{"body": image}], context)
    [(status, got)] = ours([(image, {})])
    assert status == 200 and list(got) == list(expected)
    np.testing.assert_allclose(list(got.values()), list(expected.values()), rtol=1e-5, atol=1e-7)
    if kind == "model_file":  # TorchServe's own _load_pickled_model built the same network
        x = torch.randn(2, 3, 224, 224)
        torch.testing.assert_close(ours.handler.model(x), handler.model(x))


def test_torchscript_hook_methods_answer_422_and_predictions_go_on(torchscript):
    handler, _ = torchscript
    image = base64.b64encode(png(picture(2))).decode()
    answers = handler([({"data": image}, EXPLAIN), ({"data": image, "method": "layer_ig"}, EXPLAIN), (png(picture(2)), {})])
    for status, body in answers[:2]:
        assert status == 422 and body["type"] == "method_unsupported"
        assert "TorchScript" in body["message"] and "integrated_gradients" in body["message"]
    assert answers[2][0] == 200 and set(answers[2][1]) <= set(LABELS)


def test_torchscript_serves_input_ig_equal_to_captum_on_the_scripted_model(torchscript):
    handler, model_dir = torchscript
    image = picture(3)
    request = {"data": base64.b64encode(png(image)).decode(), "method": "integrated_gradients", "target": "owl"}
    [(status, body)] = handler([(request, EXPLAIN)])
    assert status == 200, body
    explanation = body["explanation"]
    assert explanation["layer"] == "input" and explanation["n_steps"] == 8
    assert explanation["heatmap"]["shape"] == [14, 14]  # 224 px in 16-pixel cells: no layer grid to pool to
    scripted_model = torch.jit.load(str(model_dir / "tinynet.pt"))
    x = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])(image)[None]
    attributions, delta = IntegratedGradients(scripted_model).attribute(
        x, baselines=torch.zeros_like(x), target=2, n_steps=8, method="gausslegendre", return_convergence_delta=True)
    cells = sum_pool(attributions.sum(dim=1), 14, 14)[0]
    scale = float(cells.abs().max())
    assert explanation["heatmap"]["scale"] == pytest.approx(scale, rel=1e-4)
    np.testing.assert_allclose(explanation["heatmap"]["values"], (cells / scale).numpy(), atol=2e-3)
    assert explanation["convergence_delta"]["absolute"] == pytest.approx(abs(float(delta)), rel=1e-3, abs=1e-6)
