"""The model zoo, images: every kind a user packages, built as the README's "Packaging your
own models" says (its bash blocks are run here as they are written, in an empty folder),
plus a timm ViT, a Hugging Face Swin and a TorchScript model under asyncCommunication,
served by one real TorchServe, with automatic layer choice, and checked against
independent computations: Grad-CAM against a plain autograd Grad-CAM on a fresh copy of
the user's model (tests/cam_reference.py), with the preprocessing done by torchvision's
transforms or the model's own Hugging Face image processor; TorchScript predictions against
the scripted model and its input IG against captum."""
import base64
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from captum.attr import IntegratedGradients
from PIL import Image
from torchvision import transforms

import build_mar
from cam_reference import reference_maps, vit_reshape
from harness import initializes_from_mar_only, png, unpack
from tiny_vision import hf_image_classifier, scripted, timm_model, tiny_cnn, write_labels
from tsexplain.attr.image_ig import sum_pool

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]
LABELS = ["cat", "dog", "owl"]
IMAGENET = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
# What the README builds and this test serves (it also builds resnet18 and the text demo: not served here).
README_MARS = ("tinynet", "timm-resnet18", "convnext", "vit", "tinynet-ts", "by-hand")


def readme_packaging_script(readme: str, repo: Path) -> str:
    """The README's "Packaging your own models" bash blocks, in order, as one script."""
    section = readme[readme.index("## Packaging your own models"):readme.index("## Deployment")]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) >= 8 and "TSX=/path/to/torchserve-explain" in blocks[0]
    return "set -euo pipefail\n" + "\n".join(blocks).replace("TSX=/path/to/torchserve-explain", f"TSX={repo}")


class Logits(torch.nn.Module):
    """A Hugging Face image classifier's logits (the layer names under ``model.``, as served)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def tokens_grid(tokens):
    """``[N, h*w, C]`` patch tokens (no class token) on their square grid, ``[N, C, h, w]``."""
    side = int(tokens.shape[1] ** 0.5)
    return tokens.reshape(tokens.shape[0], side, side, tokens.shape[2]).permute(0, 3, 1, 2)


def torchvision_preprocessing(resize, crop):
    return transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop), transforms.ToTensor(),
                               IMAGENET])


def hf_preprocessing(folder):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    return lambda image: processor(image, return_tensors="pt")["pixel_values"][0]


def import_file(path: Path, name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The README's MARs and the extra ones in one model store, served by one TorchServe."""
    from tsexplain.tools.launcher import TorchServe

    tmp = tmp_path_factory.mktemp("zoo_image")
    user = tmp / "user"  # the README's empty folder
    user.mkdir()
    script = readme_packaging_script((ROOT / "README.md").read_text(), ROOT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(["bash", "-c", script], cwd=user, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "checked by-hand: 3 classes" in done.stdout
    store = user / "model_store"
    extra = tmp / "extra"
    extra.mkdir()
    labels = write_labels(extra / "labels.json")

    def build(*args):
        build_mar.main(["image", *map(str, args), "--labels", str(labels), "--export-path", str(store)])

    # a timm ViT by name, trained at 64 px (model_kwargs), without the model's venv (useVenv: false)
    torch.save(timm_model("test_vit", img_size=64).state_dict(), extra / "vit.pt")
    (extra / "vit.yaml").write_text(yaml.safe_dump({"useVenv": False, "handler": {
        "model_kwargs": {"img_size": 64}, "resize": 64, "crop": 64}}))
    build("--name", "timm-vit", "--timm", "test_vit", "--weights", extra / "vit.pt", "--config", extra / "vit.yaml")
    # a Hugging Face Swin
    build("--name", "hf-swin", "--hf-model-dir", hf_image_classifier("swin", extra / "swin"))
    # TorchScript under asyncCommunication, made by hand, with a hook method enabled (answered 422)
    _, _, cnn = tiny_cnn(extra / "cnn")
    code = extra / "code"
    build_mar.write_serving_code(code)
    write_labels(code / "index_to_name.json")
    (extra / "async.yaml").write_text(yaml.safe_dump({
        "asyncCommunication": True, "batchSize": 1, "minWorkers": 1, "maxWorkers": 1,
        "explain": {"methods": ["integrated_gradients", "gradcam"], "method": "integrated_gradients", "n_steps": 8}}))
    build_mar.archive("ts-async", "1.0", "image_explainer.py", code, extra / "async.yaml", store,
                      serialized_file=scripted(cnn, extra / "cnn.pt"))
    served = (*README_MARS, "timm-vit", "hf-swin", "ts-async")
    server = TorchServe(store, {name: f"{name}.mar" for name in served}, tmp / "ts")
    with server:
        pids = worker_pids(server, served)
        yield {"server": server, "user": user, "extra": extra, "pids": pids, "served": served}


def worker_pids(server, names) -> dict:
    out = {}
    for name in names:
        status, body = server.request("GET", f"{server.management_url}/models/{name}", api="management")
        workers = json.loads(body)[0]["workers"]
        assert status == 200 and [w["status"] for w in workers] == ["READY"], (name, workers)
        out[name] = [w["pid"] for w in workers]
    return out


def picture(seed, size):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def explain(server, model, image, **fields):
    body = json.dumps({"data": base64.b64encode(png(image)).decode(), **fields}).encode()
    status, raw = server.request("POST", f"{server.inference_url}/explanations/{model}", body,
                                 {"Content-Type": "application/json"})
    return status, json.loads(raw)


def predict(server, model, image):
    status, raw = server.request("POST", f"{server.inference_url}/predictions/{model}", png(image))
    return status, json.loads(raw)


def reference_model(zoo, name):
    """(a fresh copy of the user's model, its preprocessing, the expected layer, the grid reshape)."""
    user, extra = zoo["user"], zoo["extra"]
    if name in ("tinynet", "by-hand"):
        model = import_file(user / "model.py", f"user_model_{name.replace('-', '_')}").TinyNet()
        model.load_state_dict(torch.load(user / "weights.pt"))
        return model, torchvision_preprocessing(256, 224), "features", None
    if name == "timm-resnet18":
        model = timm_model("resnet18")
        model.load_state_dict(torch.load(user / "timm-resnet18.pt"))
        return model, torchvision_preprocessing(256, 224), "layer4", None
    if name == "convnext":
        model = import_file(user / "convnext.py", "user_convnext").ConvNeXtAtto()
        model.load_state_dict(torch.load(user / "convnext.pt"))
        return model, torchvision_preprocessing(256, 224), "net.stages.3", None
    if name == "timm-vit":
        model = timm_model("test_vit", img_size=64)
        model.load_state_dict(torch.load(extra / "vit.pt"))
        last = len(model.blocks) - 1
        return model, torchvision_preprocessing(64, 64), f"blocks.{last}.norm1", lambda t: vit_reshape(t, 4, 4)
    from transformers import AutoModelForImageClassification

    folder = user / "vit" if name == "vit" else extra / "swin"
    model = Logits(AutoModelForImageClassification.from_pretrained(folder))
    if name == "vit":  # transformers 5: vit.layers (4: vit.encoder.layer)
        last = len(model.model.vit.layers) - 1
        return model, hf_preprocessing(folder), f"model.vit.layers.{last}.layernorm_before", \
            lambda t: vit_reshape(t, 4, 4)
    # Swin: the last block's first LayerNorm (tsexplain.attr.layers, chosen by the pointing test), the last
    # stage's tokens [N, h*w, C] with no class token (pytorch-grad-cam's reshape for Hugging Face's Swin)
    stage = len(model.model.swin.encoder.layers) - 1
    block = len(model.model.swin.encoder.layers[stage].blocks) - 1
    return model, hf_preprocessing(folder), f"model.swin.encoder.layers.{stage}.blocks.{block}.layernorm_before", \
        tokens_grid


@pytest.mark.parametrize("name", ["tinynet", "by-hand", "timm-resnet18", "convnext", "timm-vit", "vit", "hf-swin"])
def test_gradcam_equals_plain_autograd_on_the_users_model(zoo, name):
    model, preprocess, layer, reshape = reference_model(zoo, name)
    model.eval()
    image = picture(7, (300, 260))
    status, body = explain(zoo["server"], name, image)
    assert status == 200, body
    explanation = body["explanation"]
    assert explanation["method"] == "gradcam" and explanation["layer"] == layer
    inputs = preprocess(image)[None]
    logits, _, expected = reference_maps("gradcam", model, layer, inputs, [explanation["target"]["index"]],
                                         reshape=reshape)
    assert explanation["target"]["index"] == int(logits[0].argmax()) == body["predictions"][0]["index"]
    np.testing.assert_allclose(body["predictions"][0]["probability"], float(torch.softmax(logits[0], 0).max()),
                               atol=1e-5)
    heatmap = np.array(explanation["heatmap"]["values"])
    assert heatmap.shape == tuple(expected.shape[1:]) and min(heatmap.shape) > 1  # a spatial grid
    np.testing.assert_allclose(heatmap, expected[0].numpy(), atol=2e-3)


@pytest.mark.parametrize("name", ["tinynet-ts", "ts-async"])
def test_torchscript_predicts_and_explains_input_ig_equal_to_captum(zoo, name):
    server = zoo["server"]
    path = zoo["user"] / "tinynet-scripted.pt" if name == "tinynet-ts" else zoo["extra"] / "cnn.pt"
    scripted_model = torch.jit.load(str(path))
    image = picture(8, (280, 240))
    inputs = torchvision_preprocessing(256, 224)(image)[None]
    with torch.no_grad():
        probabilities = torch.softmax(scripted_model(inputs)[0], 0)
    status, body = predict(server, name, image)
    assert status == 200
    assert list(body) == [LABELS[i] for i in probabilities.argsort(descending=True).tolist()]
    np.testing.assert_allclose([body[label] for label in LABELS], probabilities.numpy(), atol=1e-5)

    status, body = explain(server, name, image)  # the default method: integrated_gradients
    assert status == 200, body
    explanation = body["explanation"]
    assert explanation["method"] == "integrated_gradients" and explanation["layer"] == "input"
    target, n_steps = explanation["target"]["index"], explanation["n_steps"]
    attributions = IntegratedGradients(scripted_model).attribute(inputs, baselines=torch.zeros_like(inputs),
                                                                 target=target, n_steps=n_steps, method="gausslegendre")
    cells = sum_pool(attributions.sum(dim=1), 14, 14)[0]
    scale = float(cells.abs().max())
    assert explanation["heatmap"]["shape"] == [14, 14]
    assert explanation["heatmap"]["scale"] == pytest.approx(scale, rel=1e-4)
    np.testing.assert_allclose(explanation["heatmap"]["values"], (cells / scale).numpy(), atol=2e-3)

    status, body = explain(server, name, image, method="gradcam")
    if name == "tinynet-ts":  # build_mar.sh enables what a TorchScript model can run
        assert status == 403 and body["type"] == "method_not_allowed"
    else:
        assert status == 422 and body["type"] == "method_unsupported" and "TorchScript" in body["message"]


def test_workers_never_restarted(zoo):
    """Every worker is READY with the PID it had when the server came up, and no worker died
    (the issue saw a TorchScript worker restart nine times in 100 s)."""
    assert worker_pids(zoo["server"], zoo["served"]) == zoo["pids"]
    log = zoo["server"].log_text()
    assert "Backend worker process died" not in log and "Traceback" not in log


def test_timm_mars_declare_timm_and_load_in_their_venv(zoo):
    import zipfile

    import timm

    for name, venv in (("timm-resnet18", True), ("convnext", True), ("timm-vit", False)):
        with zipfile.ZipFile(zoo["user"] / "model_store" / f"{name}.mar") as mar:
            assert mar.read("requirements.txt").decode().split() == [f"timm=={timm.__version__}"]
            assert json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]["requirementsFile"] == "requirements.txt"
            assert yaml.safe_load(mar.read("model-config.yaml"))["useVenv"] is venv
    ts_log = (zoo["server"].workdir / "logs" / "ts_log.log").read_text(errors="replace")
    venvs = set(re.findall(r"Created virtual environment for model (\S+):", ts_log))  # each line is logged twice
    assert venvs == {"timm-resnet18", "convnext"}, ts_log[-3000:]


@pytest.mark.parametrize("name,module,handler", [("by-hand", "image_explainer", "ImageExplainer"),
                                                 ("tinynet-ts", "image_explainer", "ImageExplainer"),
                                                 ("vit", "image_explainer", "ImageExplainer"),
                                                 ("reviews", "text_explainer", "TextExplainer")])
def test_mars_load_without_this_repository(zoo, name, module, handler, tmp_path):
    """Unpacked, each MAR (by hand and by build_mar.sh) loads its model and builds its runner
    with only its own folder on the path: no PYTHONPATH, no editable install of this package."""
    folder = unpack(zoo["user"] / "model_store" / f"{name}.mar", tmp_path / name)
    result = initializes_from_mar_only(folder, module, handler, tmp_path)
    assert result.stdout.strip().endswith("ok"), result.stderr[-3000:]
