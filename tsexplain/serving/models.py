"""Loading users' models from the MAR's files, the same way at build time and in the
worker (no downloads): ``build_mar.sh`` and the handlers both call :func:`load_image_model`
and :func:`load_text_classifier`, so a MAR that builds also loads.

Which kind of image model a MAR holds is decided once, by :func:`image_model_source`,
from its ``handler:`` settings and its manifest (``modelFile``, ``serializedFile``):

- ``handler.architecture``: a torchvision builder name and a state dict;
- ``handler.timm``: a timm model name and a state dict (timm is an optional dependency);
- ``handler.model_path``: a Hugging Face image classifier saved with ``save_pretrained``,
  served through :class:`LogitsOnly`;
- a model file with one ``nn.Module`` class and a state dict: TorchServe's own convention
  (``BaseHandler._load_pickled_model``: the module is imported by name from the model
  folder, its one class is built without arguments and the state dict loaded into it);
- a serialized file alone: a TorchScript module (TorchServe's ``torch.jit.load``).

A state dict may be wrapped (``{"state_dict": ...}``, ``{"model": ...}``) and carry
DataParallel's ``module.`` prefixes; it is read with ``weights_only=True``. Every
problem a user can fix is a :class:`~.errors.ConfigError` with one clear message.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torchvision
from torch import nn

from .errors import ConfigError
from .images import IMAGENET_MEAN, IMAGENET_STD

TORCHVISION, TIMM, HUGGINGFACE, MODEL_FILE, TORCHSCRIPT = "torchvision", "timm", "huggingface", "model_file", "torchscript"
IMAGE_MODEL_KINDS = (TORCHVISION, TIMM, HUGGINGFACE, MODEL_FILE, TORCHSCRIPT)
NAMED_MODEL_FILE = "named_model.py"  # the model file of MARs whose model is named in handler: (it holds no class)


@dataclass(frozen=True)
class ImageModelSource:
    """What a MAR's image model is made from: its kind (:data:`IMAGE_MODEL_KINDS`), the
    name or file that defines it, and its weights file (``None``: none)."""

    kind: str
    name: Optional[str]
    weights: Optional[Path]


def image_model_source(handler, model_dir: os.PathLike, manifest_model: Mapping[str, Any]) -> ImageModelSource:
    """The kind of image model the MAR in ``model_dir`` holds, from its ``handler:`` settings
    and its manifest's ``model`` entry (``modelFile``, ``serializedFile``)."""
    model_dir = Path(model_dir)
    serialized = manifest_model.get("serializedFile")
    weights = model_dir / serialized if serialized else None
    named = {key: getattr(handler, key) for key in ("architecture", "timm", "model_path") if getattr(handler, key)}
    if len(named) > 1:
        raise ConfigError(f"handler: set one of architecture, timm and model_path, not {sorted(named)}")
    if "architecture" in named:
        return ImageModelSource(TORCHVISION, named["architecture"], weights)
    if "timm" in named:
        return ImageModelSource(TIMM, named["timm"], weights)
    if "model_path" in named:
        return ImageModelSource(HUGGINGFACE, named["model_path"], None)
    model_file = manifest_model.get("modelFile")
    if model_file:
        return ImageModelSource(MODEL_FILE, model_file, weights)
    if weights is not None:
        return ImageModelSource(TORCHSCRIPT, serialized, weights)
    raise ConfigError("the MAR holds no image model: give a model file with a state dict, a TorchScript file, "
                      "or name the model in handler.architecture, handler.timm or handler.model_path")


def load_image_model(model_dir: os.PathLike, manifest_model: Mapping[str, Any], handler,
                     device: torch.device | str = "cpu") -> nn.Module:
    """The MAR's image classifier (returning ``[N, K]`` logits), on ``device``, in eval mode."""
    source = image_model_source(handler, model_dir, manifest_model)
    kwargs = dict(handler.model_kwargs or {})
    if source.kind == TORCHVISION:
        model = build_torchvision_classifier(source.name, handler.num_classes or 1000, source.weights, device, **kwargs)
    elif source.kind == TIMM:
        model = build_timm_classifier(source.name, handler.num_classes or 1000, source.weights, device, **kwargs)
    elif source.kind == HUGGINGFACE:
        model = load_hf_image_classifier(Path(model_dir) / source.name)
    elif source.kind == MODEL_FILE:
        model = model_file_classifier(model_dir, source.name, source.weights, device)
    else:
        model = load_torchscript(source.weights, device)
    return model.to(device).eval()


def build_torchvision_classifier(
    architecture: str, num_classes: int = 1000, weights_path: Optional[os.PathLike] = None, map_location="cpu",
    **kwargs,
) -> nn.Module:
    """``torchvision.models.get_model(architecture)`` with the state dict at ``weights_path``."""
    try:
        model = torchvision.models.get_model(architecture, weights=None, num_classes=num_classes, **kwargs)
    except ValueError:
        known = ", ".join(sorted(torchvision.models.list_models(module=torchvision.models)))
        raise ConfigError(f"unknown torchvision architecture {architecture!r}; known: {known}") from None
    if weights_path:
        load_weights(model, weights_path, map_location, f"{architecture}(num_classes={num_classes})")
    return model.eval()


def build_timm_classifier(name: str, num_classes: int = 1000, weights_path: Optional[os.PathLike] = None,
                          map_location="cpu", **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=...)`` with the state dict at
    ``weights_path`` (nothing is downloaded; ``kwargs``: e.g. ``img_size``)."""
    timm = import_timm()
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as exc:  # timm's "Unknown model (...)"
        raise ConfigError(f"timm cannot build {name!r}: {exc}") from None
    if weights_path:
        load_weights(model, weights_path, map_location, f"timm {name}(num_classes={num_classes})")
    return model.eval()


def import_timm():
    """The ``timm`` module, or a ConfigError saying how to install it."""
    try:
        import timm
    except ImportError:
        raise ConfigError("this model needs timm, which is not installed where it is loaded: pip install "
                          "'torchserve-explain[timm]' (or the timm version in the MAR's requirements.txt)") from None
    return timm


def model_file_classifier(model_dir: os.PathLike, model_file: str, weights_path: Optional[os.PathLike],
                          map_location="cpu") -> nn.Module:
    """TorchServe's model-file convention (``BaseHandler._load_pickled_model``): the module
    ``model_file`` is imported by name from ``model_dir``, its one class (defined in it) is
    built without arguments, and the state dict at ``weights_path`` is loaded into it."""
    model_dir = Path(model_dir)
    if not (model_dir / model_file).is_file():
        raise ConfigError(f"model file {model_file!r} is not in the MAR")
    module_name = Path(model_file).stem
    _forget_user_module(module_name)
    added = str(model_dir) not in sys.path
    if added:  # TorchServe's worker has the model folder on its path already
        sys.path.insert(0, str(model_dir))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - the user's code: say which file failed and why
        raise ConfigError(f"model file {model_file}: import failed: {type(exc).__name__}: {exc}") from None
    finally:
        if added:
            sys.path.remove(str(model_dir))
    classes = [c for _, c in inspect.getmembers(module, inspect.isclass) if c.__module__ == module.__name__]
    if len(classes) != 1:
        names = [c.__name__ for c in classes]
        raise ConfigError(f"model file {model_file} must define exactly one class (TorchServe builds it without "
                          f"arguments); it defines {names or 'none'}")
    try:
        model = classes[0]()
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"model file {model_file}: {classes[0].__name__}() failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model file {model_file}: {classes[0].__name__} is not a torch.nn.Module")
    if weights_path:
        load_weights(model, weights_path, map_location, classes[0].__name__)
    return model


def _forget_user_module(name: str) -> None:
    """Drop an earlier user module of the same name (a build that loaded another MAR's, or
    an earlier version of this one's, ``model.py`` in this process), so that the model
    folder's file is imported afresh. Installed modules are left alone."""
    module = sys.modules.get(name)
    origin = getattr(module, "__file__", None)
    if not origin:
        return
    folder = Path(origin).resolve().parent
    if not any(folder.is_relative_to(Path(p).resolve()) for p in {sys.prefix, sys.base_prefix}):
        del sys.modules[name]


def load_torchscript(path: os.PathLike, map_location="cpu") -> nn.Module:
    """A TorchScript module saved with ``torch.jit.save`` (TorchServe's ``torch.jit.load``)."""
    try:
        return torch.jit.load(str(path), map_location=map_location)
    except Exception as exc:  # noqa: BLE001 - not TorchScript: say what to do instead
        raise ConfigError(f"{Path(path).name} is not a TorchScript file ({type(exc).__name__}); for an eager model, "
                          "package its state dict with a model file (--model-file)") from None


def read_state_dict(path: os.PathLike, map_location="cpu") -> dict:
    """The state dict in ``path`` (unwrapped, ``module.`` prefixes removed), read with
    ``weights_only=True``; a ConfigError that says what the file is otherwise."""
    if is_torchscript_file(path):
        raise ConfigError(f"{Path(path).name} is a TorchScript file, not a state dict: package it as TorchScript "
                          "(build_mar.sh image --torchscript FILE)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickled modules and other objects are refused by weights_only
        raise ConfigError(f"{Path(path).name} is not a state dict that loads with weights_only=True "
                          f"({type(exc).__name__}): save model.state_dict() with torch.save") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{Path(path).name}: expected a state dict of tensors, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: nn.Module, path: os.PathLike, map_location, described: str) -> None:
    """Load the state dict at ``path`` into ``model`` (strictly); ``described`` names the model in errors."""
    try:
        model.load_state_dict(read_state_dict(path, map_location))
    except RuntimeError as exc:
        first = " ".join(str(exc).splitlines()[0:3])
        raise ConfigError(f"weights do not fit {described}: {first}") from None


def is_torchscript_file(path: os.PathLike) -> bool:
    """True for a ``torch.jit.save`` archive (it holds TorchScript ``code/``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def is_scripted(model: nn.Module) -> bool:
    """True for a TorchScript module (no hooks can be registered on it)."""
    return isinstance(model, torch.jit.ScriptModule)


def load_hf_image_classifier(folder: Path) -> nn.Module:
    """A Hugging Face ``...ForImageClassification`` saved in ``folder``, wrapped by
    :class:`LogitsOnly`; never from a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForImageClassification

    if not (folder / "config.json").exists():
        raise ConfigError(f"no Hugging Face model at {folder.name!r} (no config.json)")
    try:
        model = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{folder.name}: not a Hugging Face image classifier ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0]})") from None
    return LogitsOnly(model)


def hf_labels(folder: os.PathLike) -> dict[str, str]:
    """``{"0": label, ...}`` from a Hugging Face model folder's ``config.json`` (``id2label``)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return {str(k): str(v) for k, v in sorted((config.get("id2label") or {}).items(), key=lambda kv: int(kv[0]))}


def load_text_classifier(model_path: Path, device: torch.device):
    """``(model, tokenizer)`` of the Hugging Face sequence classifier saved in ``model_path``
    (``save_pretrained``), on ``device`` and in eval mode; never from a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not (Path(model_path) / "config.json").exists():
        raise ConfigError(f"no Hugging Face model at {str(model_path)!r} (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(model_path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{Path(model_path).name}: not a Hugging Face sequence classifier with its tokenizer "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return model.to(device).eval(), tokenizer


class LogitsOnly(nn.Module):
    """A classifier whose output is an object with ``.logits`` (a Hugging Face
    ``...ForImageClassification``) seen as one that returns the ``[N, K]`` logits tensor,
    as the runners and the attribution methods expect. The wrapped model is ``.model``,
    so its layers are named ``model.<name>`` (``model.vit.encoder.layer.11.layernorm_before``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values)
        return out.logits if hasattr(out, "logits") else out[0]


# Pillow's resample codes in Hugging Face image-processor configs, by the filter Preprocessing calls them.
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def image_processor_settings(folder: os.PathLike) -> tuple[dict, list[str]]:
    """The ``handler:`` preprocessing (``resize``, ``crop``, ``interpolation``, ``mean``,
    ``std``) that reproduces the Hugging Face image processor saved in ``folder``
    (``preprocessor_config.json``), and warnings for what it cannot reproduce exactly.
    Covers ViT/DeiT/Swin-style (``size: {height, width}``, optional centre crop) and
    ConvNeXt/ResNet-style (``size: {shortest_edge}`` with ``crop_pct``) processors."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.exists():
        return {}, [f"{Path(folder).name} has no preprocessor_config.json: preprocessing is the handler's default "
                    "(set handler.resize, crop, mean, std with --config)"]
    config = json.loads(path.read_text())
    settings: dict = {}
    warnings: list[str] = []
    if config.get("do_rescale", True) and abs(config.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-9:
        raise ConfigError(f"{path.name}: rescale_factor {config['rescale_factor']} is not 1/255, which the handler uses")
    if config.get("do_normalize", True):
        settings["mean"] = [float(v) for v in config.get("image_mean", IMAGENET_MEAN)]
        settings["std"] = [float(v) for v in config.get("image_std", IMAGENET_STD)]
    else:
        settings["mean"], settings["std"] = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    resample = config.get("resample", 2)
    settings["interpolation"] = _RESAMPLE.get(resample, "bicubic")
    if resample not in _RESAMPLE:
        warnings.append(f"{path.name}: resample filter {resample} is not one the handler has: bicubic is used")
    size = config.get("size")
    size = {"height": size, "width": size} if isinstance(size, int) else dict(size or {})
    crop = config.get("crop_size")
    crop = {"height": crop, "width": crop} if isinstance(crop, int) else crop
    settings["resize"], settings["crop"] = None, None
    if config.get("do_resize", True):
        if "height" in size and "width" in size:
            settings["resize"] = [int(size["height"]), int(size["width"])]
        elif "shortest_edge" in size and "longest_edge" not in size:
            edge = int(size["shortest_edge"])
            if "crop_pct" in config:  # ConvNeXt's rule: below 384, resize to edge / crop_pct and crop edge
                if edge < 384:
                    settings["resize"], settings["crop"] = int(edge / config["crop_pct"]), edge
                else:
                    settings["resize"] = [edge, edge]
            else:
                settings["resize"] = edge
        else:
            raise ConfigError(f"{path.name}: size {size} is not one the handler can reproduce (height and width, "
                              "or shortest_edge); set handler.resize and handler.crop with --config")
    if config.get("do_center_crop") and crop:
        settings["crop"] = [int(crop["height"]), int(crop["width"])]
    return settings, warnings
