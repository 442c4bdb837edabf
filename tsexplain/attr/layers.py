"""Finding the layer to explain (by dotted name, or automatically) and reading its
output as a ``[N, C, h, w]`` grid (CNN maps as they are, ViT tokens and Swin's
channels-last maps reshaped)."""
from __future__ import annotations

import difflib
import math
from typing import Callable, Optional

import torch
from torch import nn

from .names import LAYOUTS

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
    # Transformers: "-1" stands for the last child. ViT: the last block's first
    # LayerNorm (its patch tokens feed the class token through attention; the final
    # encoder norm reaches the head through the class token alone), as pytorch-grad-cam.
    "VisionTransformer": "encoder.layers.-1.ln_1",
    "SwinTransformer": "features",  # channels-last [N, h, w, C]
}

# How a family's layers lay out their outputs, when not [N, C, h, w].
KNOWN_LAYOUTS = {"VisionTransformer": "tokens", "SwinTransformer": "nhwc"}

_POOLING = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule at dotted ``name`` (``"layer4"``, ``"features.7.1"``)."""
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise ValueError(f"layer {name!r} is not a module of {type(model).__name__}{hint}")


def find_target_layer(model: nn.Module, example: Optional[torch.Tensor] = None) -> str:
    """Name the layer to explain when the config names none.

    Known torchvision families use their last feature stage (``KNOWN_TARGET_LAYERS``).
    Other models, given an ``example`` input, use the last module to run that
    outputs a ``[N, C, h, w]`` map with more than one cell, pooling excluded.
    Raises ``ValueError`` when neither finds a layer.
    """
    modules = dict(model.named_modules())
    for cls in type(model).__mro__:
        pattern = KNOWN_TARGET_LAYERS.get(cls.__name__)
        name = _resolve_last(model, pattern) if pattern is not None else None
        if name is not None and name in modules:
            return name
    if example is not None:
        name = _last_spatial_module(model, example)
        if name is not None:
            return name
    raise ValueError(f"no layer with a spatial feature map found in {type(model).__name__}; "
                     "name one: the dotted name of a conv layer or block")


def find_layout(model: nn.Module) -> str:
    """The output layout of ``model``'s layers: ``tokens`` (ViT), ``nhwc`` (Swin) or ``nchw``."""
    for cls in type(model).__mro__:
        if cls.__name__ in KNOWN_LAYOUTS:
            return KNOWN_LAYOUTS[cls.__name__]
    return "nchw"


def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """ViT tokens ``[N, 1 + h*w, C]`` → ``[N, C, h, w]``: drops the class token (first)
    and lays the patch tokens out on their square grid, row by row."""
    if tokens.dim() != 3:
        raise TypeError(f"expected [N, tokens, C] ViT tokens, got shape {tuple(tokens.shape)}")
    patches = tokens[:, 1:, :]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise TypeError(f"{patches.shape[1]} patch tokens (after the class token) do not form a square grid")
    return patches.reshape(patches.shape[0], side, side, patches.shape[2]).permute(0, 3, 1, 2)


def nhwc_to_nchw(maps: torch.Tensor) -> torch.Tensor:
    """Channels-last ``[N, h, w, C]`` (Swin) → ``[N, C, h, w]``."""
    if maps.dim() != 4:
        raise TypeError(f"expected a [N, h, w, C] map, got shape {tuple(maps.shape)}")
    return maps.permute(0, 3, 1, 2)


def _as_grid(maps: torch.Tensor) -> torch.Tensor:
    if not isinstance(maps, torch.Tensor) or maps.dim() != 4:
        raise TypeError(
            f"target layer output must be a [N, C, h, w] tensor, got "
            f"{type(maps).__name__} {tuple(getattr(maps, 'shape', ()))}"
        )
    return maps


def grid_reshape(layout: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function that turns a layer output of ``layout`` into ``[N, C, h, w]``.

    Every one is a pure permutation/selection of elements, so applying it to the
    gradient of the raw output gives the gradient of the grid.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {list(LAYOUTS)}")
    return {"nchw": _as_grid, "nhwc": nhwc_to_nchw, "tokens": tokens_to_grid}[layout]


def feature_map_shape(
    model: nn.Module, layer: nn.Module, example: torch.Tensor, reshape: Optional[Callable] = None
) -> tuple[int, ...]:
    """Shape of ``layer``'s output for ``example`` (one dry forward, no grad), after
    ``reshape`` (for instance ``grid_reshape("tokens")``) when given."""
    shapes: list[tuple[int, ...]] = []

    def record(_m, _a, out):
        if reshape is not None and isinstance(out, torch.Tensor):
            out = reshape(out)
        shapes.append(tuple(getattr(out, "shape", ())))

    handle = layer.register_forward_hook(record)
    try:
        with torch.no_grad():
            model(example)
    finally:
        handle.remove()
    if not shapes:
        raise ValueError("the layer did not run in a forward pass")
    return shapes[-1]


def _resolve_last(model: nn.Module, pattern: str) -> Optional[str]:
    """``"encoder.layers.-1.ln_1"`` → ``"encoder.layers.encoder_layer_11.ln_1"``."""
    module, parts = model, []
    for part in pattern.split("."):
        children = dict(module.named_children())
        if part == "-1":
            if not children:
                return None
            part = list(children)[-1]
        if part not in children:
            return None
        module = children[part]
        parts.append(part)
    return ".".join(parts)


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
