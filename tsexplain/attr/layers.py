"""Which layer to explain, and how its output lies on a grid of the input.

- :func:`get_layer` finds a submodule by dotted name; :func:`known_layer` names the
  known-good layer of a recognised family (torchvision, timm, Hugging Face), also
  inside a wrapper (``LogitsOnly``'s ``model.``, a user's ``nn.Module``).
- :func:`spatial_grids` reads an output *shape* as a grid of the input under a layout
  (``nchw`` CNN maps, ``nhwc`` channels-last maps, ``tokens``: ``[N, prefix + h*w, C]``);
  :class:`LayerGrid` is one such reading, and turns outputs into ``[N, C, h, w]``.
- Proving a layer on a probe input (gradients, where its cells look) is
  :mod:`tsexplain.attr.layer_choice`.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import nn

from .names import LAYOUTS

# Most tokens a ViT-like layer may carry before its patch grid: class, distillation
# and register tokens (ViT 1, DeiT distilled 2, timm "reg4" models 5).
MAX_PREFIX_TOKENS = 16


@dataclass(frozen=True)
class Family:
    """A model family's known-good layer.

    ``library`` is the top-level package defining the class (``torchvision``,
    ``timm``, ``transformers``): class names repeat across libraries (timm and
    torchvision both have a ``VisionTransformer``). ``layers`` are dotted patterns
    tried in order (``-1``: the last child), relative to the module of that class.
    """

    library: str
    name: str
    layers: tuple[str, ...]
    layout: str


_HF_VIT = ("layers.-1.layernorm_before", "encoder.layer.-1.layernorm_before")  # transformers 5, 4
FAMILIES: tuple[Family, ...] = (
    # torchvision: the last spatial feature stage.
    Family("torchvision", "ResNet", ("layer4",), "nchw"),  # also ResNeXt and Wide-ResNet
    *(Family("torchvision", name, ("features",), "nchw") for name in (
        "DenseNet", "VGG", "AlexNet", "SqueezeNet", "MobileNetV2", "MobileNetV3", "EfficientNet", "ConvNeXt")),
    Family("torchvision", "RegNet", ("trunk_output",), "nchw"),
    Family("torchvision", "MNASNet", ("layers",), "nchw"),
    Family("torchvision", "ShuffleNetV2", ("conv5",), "nchw"),
    Family("torchvision", "GoogLeNet", ("inception5b",), "nchw"),
    Family("torchvision", "Inception3", ("Mixed_7c",), "nchw"),
    # ViT and DeiT: the last block's first LayerNorm, as pytorch-grad-cam. Its patch
    # tokens reach the class token through that block's attention; after the last
    # block only the class token reaches the head, so later layers have no map.
    Family("torchvision", "VisionTransformer", ("encoder.layers.-1.ln_1",), "tokens"),
    Family("timm", "VisionTransformer", ("blocks.-1.norm1",), "tokens"),  # DeiT (distilled too) subclasses it
    Family("transformers", "ViTModel", _HF_VIT, "tokens"),
    Family("transformers", "DeiTModel", _HF_VIT, "tokens"),
    # Swin: likewise the last block's first LayerNorm (channels-last in torchvision and
    # timm, tokens without a class token in Hugging Face). On Swins trained on the shapes
    # its maps point at the object more often than the last stage's output or the final
    # norm (tests/tools/test_layer_pointing.py; figures in the README).
    Family("torchvision", "SwinTransformer", ("features.-1.-1.norm1",), "nhwc"),
    Family("timm", "SwinTransformer", ("layers.-1.blocks.-1.norm1",), "nhwc"),
    Family("transformers", "SwinModel", ("encoder.layers.-1.blocks.-1.layernorm_before",), "tokens"),
    # CNNs of timm and Hugging Face: the last stage.
    Family("timm", "ConvNeXt", ("stages.-1",), "nchw"),
    Family("timm", "ResNet", ("layer4",), "nchw"),
    Family("transformers", "ConvNextModel", ("encoder.stages.-1",), "nchw"),
    Family("transformers", "ResNetModel", ("encoder.stages.-1",), "nchw"),
)
_BY_CLASS = {(f.library, f.name): f for f in FAMILIES}


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule at dotted ``name`` (``"layer4"``, ``"features.7.1"``)."""
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    close = difflib.get_close_matches(name, [n for n in modules if n], n=5)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise ValueError(f"layer {name!r} is not a module of {type(model).__name__}{hint}")


def family_of(module: nn.Module) -> Optional[Family]:
    """The known family of ``module``'s class or of one of its base classes."""
    for cls in type(module).__mro__:
        family = _BY_CLASS.get((cls.__module__.split(".")[0], cls.__name__))
        if family is not None:
            return family
    return None


def known_layer(model: nn.Module) -> Optional[tuple[str, str]]:
    """``(dotted name, layout)`` of the known-good layer, or ``None``.

    The model itself or, failing that, its outermost submodule of a known family
    is used, so wrappers are seen through: a Hugging Face model wrapped as
    ``.model`` gives ``model.vit.layers.11.layernorm_before``, a timm model kept
    as ``self.net`` in a user's module gives ``net.blocks.11.norm1``.
    """
    names = {id(module): name for name, module in model.named_modules()}  # a shared module's first name
    for module in list(model.modules()):
        family = family_of(module)
        if family is None:
            continue
        for pattern in family.layers:
            layer = _resolve_last(module, pattern)
            if layer is not None:
                return names[id(layer)], family.layout
    return None


def find_target_layer(model: nn.Module, example: Optional[torch.Tensor] = None) -> str:
    """Name the layer to explain when the config names none.

    Known families use their known-good layer (:func:`known_layer`); other models,
    given an ``example`` input, the layer :func:`tsexplain.attr.layer_choice.choose_layer`
    proves. Raises ``ValueError`` when neither finds a layer.
    """
    known = known_layer(model)
    if known is not None:
        return known[0]
    if example is not None:
        from .layer_choice import choose_layer  # it builds on this module

        return choose_layer(model, example).name
    raise ValueError(f"no layer with a spatial feature map found in {type(model).__name__}; "
                     "name one: the dotted name of a conv layer or block")


def find_layout(model: nn.Module) -> str:
    """The layout of the known-good layer's output (``nchw`` when the family is unknown)."""
    known = known_layer(model)
    return known[1] if known is not None else "nchw"


@dataclass(frozen=True)
class LayerGrid:
    """How a layer's output lies on the input: ``height`` × ``width`` cells of
    ``channels`` values, read under ``layout``, after ``prefix_tokens`` leading
    tokens (class, distillation, register tokens; ``tokens`` layout only).

    ``localisation`` (set by :func:`tsexplain.attr.layer_choice.inspect_layer`) is how
    far the input region behind the last row (column) lies from the first row's
    (column's), as a fraction of the ideal: about 1 for a sharply local grid, near 0
    when every cell sees the whole image alike.
    """

    name: str
    layout: str
    height: int
    width: int
    channels: int
    prefix_tokens: int = 0
    localisation: Optional[tuple[float, float]] = None

    def to_grid(self, output: torch.Tensor) -> torch.Tensor:
        """The layer's output (or its gradient) as ``[N, channels, height, width]``."""
        if self.layout == "tokens":
            return tokens_to_grid(output, self.prefix_tokens, (self.height, self.width))
        grid = nhwc_to_nchw(output) if self.layout == "nhwc" else _as_grid(output)
        if grid.shape[1] != self.channels:  # maps may change size with the input; channels may not
            raise TypeError(f"{self.name} output {tuple(output.shape)} does not have the {self.channels} "
                            f"channels of its {self.layout} grid at load")
        return grid

    def __str__(self) -> str:
        prefix = f", {self.prefix_tokens} prefix token{'s' * (self.prefix_tokens != 1)}" if self.layout == "tokens" else ""
        return f"{self.name} ({self.layout}{prefix}, {self.height}x{self.width} cells, {self.channels} channels)"


def tokens_to_grid(tokens: torch.Tensor, prefix_tokens: int = 1, grid: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """ViT tokens ``[N, prefix + h*w, C]`` → ``[N, C, h, w]``: drops the ``prefix_tokens``
    leading tokens (class, distillation, register tokens) and lays the patch tokens
    out row by row on ``grid`` = ``(h, w)`` (default: a square)."""
    if tokens.dim() != 3:
        raise TypeError(f"expected [N, tokens, C] ViT tokens, got shape {tuple(tokens.shape)}")
    patches = tokens[:, prefix_tokens:, :]
    count = patches.shape[1]
    if grid is None:
        side = math.isqrt(count)
        if side * side != count:
            raise TypeError(f"{count} patch tokens (after {prefix_tokens} prefix tokens) do not form a square grid")
        grid = (side, side)
    if grid[0] * grid[1] != count:
        raise TypeError(f"{count} patch tokens (after {prefix_tokens} prefix tokens) do not form a "
                        f"{grid[0]}x{grid[1]} grid")
    return patches.reshape(patches.shape[0], grid[0], grid[1], patches.shape[2]).permute(0, 3, 1, 2)


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


def grid_reshape(layout: Union[str, LayerGrid]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function that turns a layer output into ``[N, C, h, w]``.

    ``layout`` is a :class:`LayerGrid` (as inspected: its prefix tokens and grid
    shape) or a layout name (``tokens`` then means one class token and a square
    grid). Every one is a pure permutation/selection of elements, so applying it
    to the gradient of the raw output gives the gradient of the grid.
    """
    if isinstance(layout, LayerGrid):
        return layout.to_grid
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {list(LAYOUTS)}")
    return {"nchw": _as_grid, "nhwc": nhwc_to_nchw, "tokens": tokens_to_grid}[layout]


def spatial_grids(shape: tuple[int, ...], input_size: tuple[int, int], layout: str) -> list[tuple[int, int, int, int]]:
    """Every ``(height, width, channels, prefix_tokens)`` that an output of ``shape``
    can be, under ``layout``, for an input of ``input_size`` = ``(H, W)``.

    A grid has more than one cell and follows the input's geometry, as stacked
    convolutions and patch embeddings do (the same ops on both axes):

    - ``nchw``/``nhwc``: at most ``H`` × ``W`` cells; a square input gives a square
      grid; otherwise some integer stride ``s`` accounts for the sides' difference
      (``s * (h - w)`` within ``s`` of ``H - W``, borders lost to unpadded
      convolutions allowed).
    - ``tokens``: ``prefix + h*w`` tokens, ``prefix`` at most ``MAX_PREFIX_TOKENS``,
      with ``(h, w)`` a patch grid: ``(H // s, W // s)`` or, padded, rounded up, and
      more than one channel: ``[N, C, 1]`` is a pooled vector (Hugging Face Swin's
      ``pooler``), whose ``C`` values would otherwise read as one-channel tokens.

    ViT attention keys ``[N, heads, tokens, head_dim]`` read as ``nchw`` are not a
    grid (``tokens`` × ``head_dim`` cells). An empty list: no reading fits.
    """
    height, width = input_size
    if layout == "tokens":
        if len(shape) != 3 or shape[2] < 2:
            return []
        found = []
        for stride in range(1, max(height, width) + 1):
            for h, w in {(height // stride, width // stride), (-(-height // stride), -(-width // stride))}:
                prefix = shape[1] - h * w
                if h * w > 1 and 0 <= prefix <= MAX_PREFIX_TOKENS and (h, w, shape[2], prefix) not in found:
                    found.append((h, w, shape[2], prefix))
        return sorted(found, key=lambda g: g[3])
    if layout not in ("nchw", "nhwc"):
        raise ValueError(f"unknown layout {layout!r}; known: {list(LAYOUTS)}")
    if len(shape) != 4:
        return []
    h, w, channels = (shape[2], shape[3], shape[1]) if layout == "nchw" else (shape[1], shape[2], shape[3])
    return [(h, w, channels, 0)] if _follows_input(h, w, height, width) else []


def _follows_input(h: int, w: int, height: int, width: int) -> bool:
    if h * w <= 1 or h > height or w > width:
        return False
    if height == width:
        return h == w
    return any(abs(s * (h - w) - (height - width)) <= s and h <= -(-height // s) + 1 and w <= -(-width // s) + 1
               for s in range(1, max(height, width) + 1))


def describe_shape(shape: tuple[int, ...], input_size: tuple[int, int], layout: str) -> str:
    """Why ``shape`` is no grid of ``input_size`` under ``layout`` (for error messages)."""
    height, width = input_size
    dims = list(shape)
    if layout == "tokens":
        if len(shape) != 3:
            return f"tokens: expected [N, tokens, C], got {dims}"
        if shape[2] < 2:
            return f"tokens: one value per token, a pooled vector rather than tokens ({dims})"
        return (f"tokens: {shape[1]} tokens are no patch grid of a {height}x{width} input "
                f"after at most {MAX_PREFIX_TOKENS} prefix tokens")
    if len(shape) != 4:
        return f"{layout}: expected 4 dimensions, got {dims}"
    h, w = (shape[2], shape[3]) if layout == "nchw" else (shape[1], shape[2])
    if h * w <= 1:
        return f"{layout}: a single cell"
    return f"{layout}: {h}x{w} cells do not follow a {height}x{width} input"


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


def _resolve_last(model: nn.Module, pattern: str) -> Optional[nn.Module]:
    """The module at ``pattern`` (``"encoder.layers.-1.ln_1"``: ``-1`` is the last child), or ``None``."""
    module = model
    for part in pattern.split("."):
        children = dict(module.named_children())
        if part == "-1":
            if not children:
                return None
            part = list(children)[-1]
        if part not in children:
            return None
        module = children[part]
    return module
