"""Loading users' models (tsexplain.serving.models): the kind a MAR holds, each loader,
and the clear error for each thing a user can get wrong."""
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_vision import HF_IMAGE_FAMILIES, hf_image_classifier, scripted, timm_model, tiny_cnn
from tsexplain.serving import models
from tsexplain.serving.errors import ConfigError
from tsexplain.serving.settings import ImageModelSettings


def handler(**keys):
    return ImageModelSettings(**keys)


@pytest.mark.parametrize("keys,manifest,kind", [
    ({"architecture": "resnet18"}, {"modelFile": "named_model.py", "serializedFile": "w.pt"}, models.TORCHVISION),
    ({"timm": "test_resnet"}, {"modelFile": "named_model.py", "serializedFile": "w.pt"}, models.TIMM),
    ({"model_path": "hf_model"}, {"modelFile": "named_model.py"}, models.HUGGINGFACE),
    ({}, {"modelFile": "model.py", "serializedFile": "w.pt"}, models.MODEL_FILE),
    ({}, {"modelFile": "model.py"}, models.MODEL_FILE),
    ({}, {"serializedFile": "model.pt"}, models.TORCHSCRIPT),
])
def test_the_kind_of_model_follows_the_settings_then_torchserves_conventions(keys, manifest, kind, tmp_path):
    assert models.image_model_source(handler(**keys), tmp_path, manifest).kind == kind


def test_two_names_or_no_model_at_all_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"one of architecture, timm and model_path, not \['architecture', 'timm'\]"):
        models.image_model_source(handler(architecture="resnet18", timm="resnet18"), tmp_path, {})
    with pytest.raises(ConfigError, match="holds no image model"):
        models.image_model_source(handler(), tmp_path, {})


def test_a_model_file_loads_as_torchserve_loads_it(tmp_path):
    source, weights, model = tiny_cnn(tmp_path / "a")
    loaded = models.load_image_model(tmp_path / "a", {"modelFile": "model.py", "serializedFile": "tinynet.pt"},
                                     handler())
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), model(x))
    assert not loaded.training


def test_model_files_of_the_same_name_from_two_folders_each_load_their_own(tmp_path):
    """A build process loads many MARs' model.py: each must get its own class."""
    tiny_cnn(tmp_path / "a", seed=0)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "model.py").write_text("from torch import nn\n\n\nclass Other(nn.Linear):\n"
                                             "    def __init__(self):\n        super().__init__(2, 5)\n")
    first = models.model_file_classifier(tmp_path / "a", "model.py", None)
    second = models.model_file_classifier(tmp_path / "b", "model.py", None)
    assert type(first).__name__ == "TinyNet" and type(second).__name__ == "Other"


@pytest.mark.parametrize("source,message", [
    ("from torch import nn\n\n\nclass A(nn.Module):\n    pass\n\n\nclass B(nn.Module):\n    pass\n",
     r"must define exactly one class .* it defines \['A', 'B'\]"),
    ("import torch\n", "must define exactly one class .* it defines none"),
    ("import not_a_module_anywhere\n", "import failed: ModuleNotFoundError: No module named 'not_a_module_anywhere'"),
    ("class A:\n    pass\n", "A is not a torch.nn.Module"),
    ("from torch import nn\n\n\nclass A(nn.Module):\n    def __init__(self, width):\n        super().__init__()\n",
     r"A\(\) failed: TypeError"),
])
def test_model_file_mistakes_are_named(tmp_path, source, message):
    (tmp_path / "broken_model.py").write_text(source)
    with pytest.raises(ConfigError, match=message):
        models.model_file_classifier(tmp_path, "broken_model.py", None)
    sys.modules.pop("broken_model", None)


def test_state_dicts_wrapped_or_prefixed_load(tmp_path):
    _, _, model = tiny_cnn(tmp_path)
    for i, wrapped in enumerate([{"state_dict": model.state_dict()},
                                 {"model": {f"module.{k}": v for k, v in model.state_dict().items()}}]):
        torch.save(wrapped, tmp_path / f"w{i}.pt")
        assert models.read_state_dict(tmp_path / f"w{i}.pt").keys() == model.state_dict().keys()


def test_files_that_are_not_state_dicts_say_what_they_are_and_what_to_do(tmp_path):
    _, _, model = tiny_cnn(tmp_path)
    scripted(model, tmp_path / "scripted.pt")
    with pytest.raises(ConfigError, match="is a TorchScript file, not a state dict: package it as TorchScript"):
        models.read_state_dict(tmp_path / "scripted.pt")
    torch.save(torch.nn.Linear(2, 3), tmp_path / "pickled.pt")  # a whole module, pickled
    with pytest.raises(ConfigError, match=r"not a state dict that loads with weights_only=True .* save "
                                          r"model.state_dict\(\)"):
        models.read_state_dict(tmp_path / "pickled.pt")
    with pytest.raises(ConfigError, match=r"is not a TorchScript file .* \(--model-file\)"):
        models.load_torchscript(tmp_path / "tinynet.pt")


def test_weights_that_do_not_fit_name_the_model(tmp_path):
    torch.save(timm_model("test_resnet").state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConfigError, match=r"weights do not fit timm test_resnet\(num_classes=5\)"):
        models.build_timm_classifier("test_resnet", 5, tmp_path / "w.pt")
    with pytest.raises(ConfigError, match="timm cannot build 'no_such_model'"):
        models.build_timm_classifier("no_such_model", 3)


def test_timm_missing_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ConfigError, match=r"needs timm, which is not installed .*'torchserve-explain\[timm\]'"):
        models.build_timm_classifier("test_resnet", 3)


def test_torchscript_loads_and_is_known_as_scripted(tmp_path):
    _, _, model = tiny_cnn(tmp_path)
    scripted(model, tmp_path / "model.pt")
    loaded = models.load_image_model(tmp_path, {"serializedFile": "model.pt"}, handler())
    assert models.is_scripted(loaded) and not models.is_scripted(model)
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("family", sorted(HF_IMAGE_FAMILIES))
def test_hugging_face_preprocessing_equals_its_image_processor(family, tmp_path):
    """The handler's preprocessing, from the settings the build derives from the model's
    preprocessor_config.json, gives the tensor Hugging Face's own (PIL) image processor gives;
    and the wrapped model's logits are the Hugging Face model's."""
    from transformers import AutoImageProcessor

    folder = hf_image_classifier(family, tmp_path / family)
    settings, warnings = models.image_processor_settings(folder)
    assert warnings == []
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (57, 83, 3), dtype=np.uint8))
    ours = ImageModelSettings(**settings).preprocessing()(image)
    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    theirs = processor(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    wrapped = models.load_image_model(tmp_path, {"modelFile": "named_model.py"}, handler(model_path=family))
    assert models.hf_labels(folder) == {"0": "cat", "1": "dog", "2": "owl"}
    torch.testing.assert_close(wrapped(ours[None]), wrapped.model(pixel_values=ours[None]).logits)


def test_processor_configs_the_handler_cannot_reproduce_are_refused_or_warned(tmp_path):
    import json

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 800, "longest_edge": 1333}}))
    with pytest.raises(ConfigError, match="is not one the handler can reproduce"):
        models.image_processor_settings(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": 32, "resample": 1, "rescale_factor": 1 / 255}))
    settings, warnings = models.image_processor_settings(tmp_path)
    assert settings["resize"] == [32, 32] and settings["interpolation"] == "bicubic"
    assert warnings and "resample filter 1" in warnings[0]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"rescale_factor": 1.0}))
    with pytest.raises(ConfigError, match="rescale_factor 1.0 is not 1/255"):
        models.image_processor_settings(tmp_path)
    assert "no preprocessor_config.json" in models.image_processor_settings(tmp_path / "nothing")[1][0]


def test_hugging_face_folder_without_config_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no Hugging Face model at 'missing'"):
        models.load_image_model(tmp_path, {}, SimpleNamespace(architecture=None, timm=None, model_path="missing",
                                                              model_kwargs=None, num_classes=None))


def test_timm_model_kwargs_reach_the_builder(tmp_path):
    torch.save(timm_model("test_vit", img_size=32).state_dict(), tmp_path / "w.pt")
    model = models.load_image_model(tmp_path, {"modelFile": "named_model.py", "serializedFile": "w.pt"},
                                    handler(timm="test_vit", num_classes=3, model_kwargs={"img_size": 32}))
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)
    assert Path(sys.modules[type(model).__module__].__file__).parts[-3] == "timm"
