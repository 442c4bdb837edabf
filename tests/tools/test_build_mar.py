"""build_mar.sh: a MAR that builds, loads. The build loads the model and explains a probe
input as the worker will, and fails there, with the message the worker would give, one
line and exit status 2, no traceback, and no MAR left behind."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

import build_mar
from tiny_vision import scripted, tiny_cnn, write_labels

ROOT = Path(__file__).resolve().parents[2]


def run_build(*args):
    return subprocess.run([str(ROOT / "build_mar.sh"), *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def build(capsys, tmp_path, *args, output=False):
    """``build_mar.main`` in this process: (exit status, stderr[, stdout])."""
    try:
        build_mar.main([*map(str, args), "--export-path", str(tmp_path / "store")])
        status = 0
    except SystemExit as exc:
        status = exc.code
    captured = capsys.readouterr()
    return (status, captured.err, captured.out) if output else (status, captured.err)


@pytest.fixture
def cnn(tmp_path):
    source, weights, _ = tiny_cnn(tmp_path / "user")
    return source, weights, write_labels(tmp_path / "labels.json")


def config(tmp_path, content: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def test_a_failed_build_is_one_line_exit_2_and_leaves_no_mar(tmp_path, cnn):
    """Through the shell script, as a user runs it: a config typo fails the build."""
    source, weights, labels = cnn
    result = run_build("image", "--name", "m", "--model-file", source, "--weights", weights, "--labels", labels,
                       "--config", config(tmp_path, {"explain": {"topk": 3}}), "--export-path", tmp_path / "store")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("build_mar.sh: error:")]
    assert len(errors) == 1 and "unknown setting(s) ['topk'] in 'explain'" in errors[0], result.stderr
    assert not (tmp_path / "store" / "m.mar").exists()


def test_weights_that_do_not_fit_the_labels_fail_at_build(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "w.pt")
    (tmp_path / "labels.json").write_text(json.dumps({"0": "a", "1": "b"}))
    result = run_build("image", "--name", "m", "--architecture", "resnet18", "--weights", tmp_path / "w.pt",
                       "--labels", tmp_path / "labels.json", "--export-path", tmp_path / "store")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "do not fit resnet18(num_classes=2)" in result.stderr and "2 classes" in result.stderr
    assert not (tmp_path / "store" / "m.mar").exists()


@pytest.mark.parametrize("case,message", [
    ("typo", "unknown setting(s) ['topk'] in 'explain'"),
    ("bad value", "explain.n_steps must be an int in [1, max_n_steps]"),
    ("two classes", "must define exactly one class (TorchServe builds it without arguments); it defines ['A', 'B']"),
    ("torchscript as weights", "is a TorchScript file, not a state dict: package it as TorchScript"),
    ("labels", "the labels name 2 classes, the model outputs 3"),
    ("forward fails", "the model failed on a probe input: RuntimeError"),
    ("async batch", "asyncCommunication: true needs batchSize: 1 (got 4)"),
    ("not spatial", "layer 'head' is not a spatial grid: it outputs [1, 3] for a 224x224 input"),
    ("torchscript gradcam", "probe: method gradcam failed (422 method_unsupported): method 'gradcam' needs forward "
                            "hooks on a layer, which a TorchScript model does not support"),
    ("unknown architecture", "unknown torchvision architecture 'resnet19'"),
    ("missing file", "--weights"),
    ("two kinds", "image: give one of --architecture, --timm, --model-file, --hf-model-dir, --torchscript "
                  "(got --architecture, --model-file)"),
])
def test_each_failure_mode_is_named(capsys, tmp_path, cnn, case, message):
    source, weights, labels = cnn
    args = ["image", "--name", "m", "--model-file", source, "--weights", weights, "--labels", labels]
    if case == "typo":
        args += ["--config", config(tmp_path, {"explain": {"topk": 3}})]
    elif case == "bad value":
        args += ["--config", config(tmp_path, {"explain": {"methods": ["gradcam", "layer_ig"], "n_steps": 0}})]
    elif case == "two classes":
        source.write_text(source.read_text() + "\n\nclass B(nn.Module):\n    pass\n")
        source.write_text(source.read_text().replace("class TinyNet", "class A"))
    elif case == "torchscript as weights":
        _, _, model = tiny_cnn(tmp_path / "other")
        args[6] = scripted(model, tmp_path / "s.pt")
    elif case == "labels":
        args[-1] = write_labels(tmp_path / "two.json", ("a", "b"))
    elif case == "forward fails":
        source.write_text(source.read_text().replace("nn.Conv2d(3, 8", "nn.Conv2d(1, 8"))
        args = args[:5] + args[7:]  # no weights: the class's own init
    elif case == "async batch":
        args += ["--config", config(tmp_path, {"asyncCommunication": True, "batchSize": 4})]
    elif case == "not spatial":
        args += ["--config", config(tmp_path, {"explain": {"target_layer": "head"}})]
    elif case == "torchscript gradcam":
        _, _, model = tiny_cnn(tmp_path / "other")
        args = ["image", "--name", "m", "--torchscript", scripted(model, tmp_path / "s.pt"), "--labels", labels,
                "--config", config(tmp_path, {"explain": {"methods": ["integrated_gradients", "gradcam"]}})]
    elif case == "unknown architecture":
        args = ["image", "--name", "m", "--architecture", "resnet19", "--weights", weights, "--labels", labels]
    elif case == "missing file":
        args[6] = tmp_path / "nope.pt"
    elif case == "two kinds":
        args += ["--architecture", "resnet18"]
    status, err = build(capsys, tmp_path, *args)
    assert status == 2, err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "store" / "m.mar").exists()
    sys.modules.pop("model", None)


def test_text_folder_problems_are_named(capsys, tmp_path):
    status, err = build(capsys, tmp_path, "text", "--name", "t", "--model-dir", tmp_path)
    assert status == 2 and "not a Hugging Face model directory (no config.json)" in err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    status, err = build(capsys, tmp_path, "text", "--name", "t", "--model-dir", tmp_path)
    assert status == 2 and "not a Hugging Face sequence classifier with its tokenizer" in err, err


def test_asynccommunication_gets_batch_size_one_unless_set(capsys, tmp_path, cnn):
    source, weights, labels = cnn
    status, _ = build(capsys, tmp_path, "image", "--name", "m", "--model-file", source, "--weights", weights,
                      "--labels", labels, "--config", config(tmp_path, {"asyncCommunication": True}))
    assert status == 0
    import zipfile

    with zipfile.ZipFile(tmp_path / "store" / "m.mar") as mar:
        packed = yaml.safe_load(mar.read("model-config.yaml"))
    assert packed["asyncCommunication"] is True and packed["batchSize"] == 1
    sys.modules.pop("model", None)


def test_a_model_file_with_its_own_modules_and_requirements(capsys, tmp_path, cnn):
    """--extra-files puts the modules the model file imports beside it; --requirements lines
    go into the MAR's requirements.txt, which then turns on the model's virtual environment."""
    import zipfile

    source, weights, labels = cnn
    (tmp_path / "blocks.py").write_text(source.read_text().replace("class TinyNet", "class Body"))
    source.write_text("from blocks import Body\n\n\nclass Wrapped(Body):\n    pass\n")
    (tmp_path / "req.txt").write_text("einops==0.8.1\n")
    status, err = build(capsys, tmp_path, "image", "--name", "m", "--model-file", source, "--weights", weights,
                        "--labels", labels, "--extra-files", tmp_path / "blocks.py", "--requirements",
                        tmp_path / "req.txt")
    assert status == 0, err
    with zipfile.ZipFile(tmp_path / "store" / "m.mar") as mar:
        assert {"model.py", "blocks.py", "tinynet.pt", "requirements.txt"} <= set(mar.namelist())
        assert mar.read("requirements.txt").decode() == "einops==0.8.1\n"
        assert yaml.safe_load(mar.read("model-config.yaml"))["useVenv"] is True
    for name in ("model", "blocks"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize("family,layer", [("deit", "model.deit.layers.1.layernorm_before"),
                                          ("convnext", "model.convnext.encoder.stages.1"),
                                          ("resnet", "model.resnet.encoder.stages.1")])
def test_hugging_face_image_families_build_with_their_processor_and_layer(capsys, tmp_path, family, layer):
    """The Hugging Face families the zoo does not serve (it serves ViT and Swin): labels from
    id2label, preprocessing from the processor config, the known-good layer, every CAM method
    explained by the build's check."""
    import zipfile

    from tiny_vision import hf_image_classifier

    folder = hf_image_classifier(family, tmp_path / family)
    status, err, out = build(capsys, tmp_path, "image", "--name", family, "--hf-model-dir", folder, output=True)
    assert status == 0, err
    assert f"checked {family}: 3 classes, layer {layer}; a probe input explained with gradcam, gradcam++, layercam" in out
    with zipfile.ZipFile(tmp_path / "store" / f"{family}.mar") as mar:
        config = yaml.safe_load(mar.read("model-config.yaml"))
        assert json.loads(mar.read("index_to_name.json")) == {"0": "cat", "1": "dog", "2": "owl"}
        assert any(name.startswith("hf_model/") for name in mar.namelist())
    assert config["handler"]["model_path"] == "hf_model"
    assert config["handler"]["interpolation"] == "bicubic" and config["handler"]["crop"] in ([32, 32], 32)


def test_audit_and_token_settings_fail_at_build(capsys, tmp_path, cnn):
    """explain.audit and explain.tokens are validated at build as at load. The sink may be
    left to the serving machine's environment (TSEXPLAIN_AUDIT_SINK)."""
    source, weights, labels = cnn
    args = ["image", "--name", "m", "--model-file", source, "--weights", weights, "--labels", labels]
    for content, message in [
        ({"explain": {"audit": {"record": "every"}}}, "explain.audit.record must be one of"),
        ({"explain": {"audit": {"record": "all", "sink": "sqlite://relative.db"}}}, "absolute file path"),
        ({"explain": {"audit": {"record": "all", "retention": 30}}}, "unknown setting(s) ['retention'] in 'explain.audit'"),
        ({"explain": {"tokens": {"default": {"env": "T"}}}}, "'default' is reserved"),
        ({"explain": {"audit": ["all"]}}, "explain.audit must be a mapping"),
    ]:
        status, err = build(capsys, tmp_path, *args, "--config", config(tmp_path, content))
        assert status == 2 and message in err and "Traceback" not in err, (content, err)
        assert not (tmp_path / "store" / "m.mar").exists()
        sys.modules.pop("model", None)
    good = {"explain": {"audit": {"record": "all"}, "tokens": {"team-a": {"env": "TEAM_A_TOKEN"}}}}
    status, err = build(capsys, tmp_path, *args, "--config", config(tmp_path, good))
    assert status == 0, err
    assert (tmp_path / "store" / "m.mar").exists()
    sys.modules.pop("model", None)
