"""Finding the layer to explain: by dotted name, or automatically."""
from __future__ import annotations

import difflib
from typing import Optional

import torch
from torch import nn

from .errors import ConfigError

# Last spatial feature map of the torchvision classifier families, by class name.
# Matched against the model's class and its base classes, so subclasses work too.
KNOWN_TARGET_LAYERS = {
    "ResNet": "layer4",  # also ResNeXt and Wide-ResNet
    "DenseNet": "features",
    "VGG": "features",
    "AlexNet": "features",
    "SqueezeNet": "features",
    "MobileNetV2": "features",
    "MobileNetV3": "features",
    "EfficientNet": "features",
    "ConvNeXt": "features",
    "RegNet": "trunk_output",
    "MNASNet": "layers",
    "ShuffleNetV2": "conv5",
    "GoogLeNet": "inception5b",
    "Inception3": "Mixed_7c",
}

_POOLING = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule at dotted ``name`` (``"layer4"``, ``"features.7.1"``)."""
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise ConfigError(f"target layer {name!r} is not a module of {type(model).__name__}{hint}")


def find_target_layer(model: nn.Module, example: Optional[torch.Tensor] = None) -> str:
    """Name the layer to explain when the config names none.

    Known torchvision families use their last feature stage (``KNOWN_TARGET_LAYERS``).
    Other models, given an ``example`` input, use the last module to run that
    outputs a ``[N, C, h, w]`` map with more than one cell, pooling excluded.
    Raises ``ConfigError`` when neither finds a layer.
    """
    modules = dict(model.named_modules())
    for cls in type(model).__mro__:
        name = KNOWN_TARGET_LAYERS.get(cls.__name__)
        if name is not None and name in modules:
            return name
    if example is not None:
        name = _last_spatial_module(model, example)
        if name is not None:
            return name
    raise ConfigError(
        f"no layer with a spatial feature map found in {type(model).__name__}; "
        "set explain.target_layer to the dotted name of a conv layer or block"
    )


def feature_map_shape(model: nn.Module, layer: nn.Module, example: torch.Tensor) -> tuple[int, ...]:
    """Shape of ``layer``'s output for ``example`` (one dry forward, no grad)."""
    shapes: list[tuple[int, ...]] = []
    handle = layer.register_forward_hook(lambda m, a, out: shapes.append(tuple(getattr(out, "shape", ()))))
    try:
        with torch.no_grad():
            model(example)
    finally:
        handle.remove()
    if not shapes:
        raise ConfigError("the target layer did not run in a forward pass")
    return shapes[-1]


def _last_spatial_module(model: nn.Module, example: torch.Tensor) -> Optional[str]:
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if not name or isinstance(module, _POOLING):
            continue

        def record(_m, _a, out, name=name):
            if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[2] * out.shape[3] > 1:
                order.append(name)

        handles.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return order[-1] if order else None
