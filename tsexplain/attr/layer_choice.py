"""Choosing the layer to explain and proving it on a probe input.

A layer is used only when its output, on a probe through the model, is a spatial
grid of the input (:func:`tsexplain.attr.layers.spatial_grids`) and:

- the logits depend on it, and its *cells* get gradient: after a ViT's last block
  only the class token reaches the head, so the patch tokens of its final norm get
  none and a map there would be flat;
- it holds features, not attention weights (rows that sum to one);
- its cells look where they sit: the input region behind its last row (column)
  lies below (right of) the one behind its first row (column), measured as the
  centroid of the input gradient of a random channel mix of that row (column).
  Attention keys ``[N, heads, tokens, head_dim]`` read as a grid fail here when
  their shape happens to fit: their "columns" are features of the same tokens.
  Untrained CNNs on small inputs are often barely local on both axes alike; that
  proves nothing either way and is accepted.

:func:`choose_layer` is the one call for serving and packaging: the configured
layer, else the family's known-good one, else the last layer that passes. Its
errors (:class:`LayerChoiceError`, a ``ValueError``) list the candidates.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Optional, Union

import torch
from torch import nn

from .layers import LayerGrid, describe_shape, get_layer, known_layer, spatial_grids
from .names import LAYOUTS

# Above this localisation strength (the largest centroid shift, as a fraction of the
# ideal), each grid axis must follow its own input axis by AXIS_SHARE of the strength.
LOCALISED = 0.15
AXIS_SHARE = 0.4
CROSS_SHARE = 0.5  # and move sideways by at most this share of that
MAX_SCAN = 32  # layers the automatic scan proves before giving up
SHOWN_CANDIDATES = 8

_SKIPPED = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AvgPool2d,
            nn.MaxPool2d, nn.Identity, nn.Dropout, nn.Dropout2d, nn.Flatten)


class LayerChoiceError(ValueError):
    """No usable layer; ``candidates`` are the layers whose output is a grid by shape."""

    def __init__(self, message: str, candidates: list[LayerGrid]):
        super().__init__(message)
        self.candidates = candidates


def probe_input(height: int, width: int, channels: int = 3, device=None, dtype=torch.float32) -> torch.Tensor:
    """The probe: ``[1, channels, height, width]`` standard normal values, the same every time."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, channels, height, width, generator=generator).to(device=device, dtype=dtype)


def inspect_layer(model: nn.Module, layer: Union[str, nn.Module], example: torch.Tensor, layout: str = "auto",
                  prefer: Optional[str] = None) -> LayerGrid:
    """Prove that ``layer``'s output is a spatial grid of ``example``'s ``[1, C, H, W]`` input.

    Args:
        model: a classifier returning ``[N, K]`` logits, in eval mode.
        layer: the layer, or its dotted name.
        example: the probe (:func:`probe_input` at the serving size).
        layout: ``nchw``, ``nhwc``, ``tokens``, or ``auto``: whichever fits (``prefer``
            first, then ``nchw``, ``nhwc``, ``tokens``; fewest prefix tokens first).

    Returns the :class:`LayerGrid`, with its measured ``localisation``.
    Raises ``ValueError`` saying why when no reading of the output passes.
    Leaves no hooks and no gradients behind.
    """
    name, module = _named(model, layer)
    layouts = _layouts(layout, prefer)
    size = (int(example.shape[-2]), int(example.shape[-1]))
    with _Probe(model, module, example) as probe:
        if probe.output is None:
            raise ValueError(f"layer {name!r} did not run in a forward pass")
        if not isinstance(probe.output, torch.Tensor):
            raise ValueError(f"layer {name!r} outputs a {type(probe.output).__name__}, not a tensor")
        shape = tuple(probe.output.shape)
        readings = [LayerGrid(name, lay, *reading) for lay in layouts for reading in spatial_grids(shape, size, lay)]
        if not readings:
            reasons = "; ".join(describe_shape(shape, size, lay) for lay in layouts)
            raise ValueError(f"layer {name!r} is not a spatial grid: it outputs {list(shape)} for a "
                             f"{size[0]}x{size[1]} input ({reasons})")
        gradient = probe.score_gradient()
        if gradient is None:
            raise ValueError(f"layer {name!r}: the logits do not depend on its output")
        refusals = []
        for grid in readings:
            reason = _probabilities(grid, probe.output) or _no_gradient(grid, gradient)
            localisation = None
            if reason is None:
                localisation, reason = _localisation(probe, grid)
            if reason is None:
                return replace(grid, localisation=localisation)
            refusals.append(f"as {_reading(grid)}: {reason}")
    raise ValueError(f"layer {name!r} ({list(shape)}) is not a usable grid: {'; '.join(refusals)}")


def grid_shaped_layers(model: nn.Module, example: torch.Tensor) -> list[LayerGrid]:
    """Every layer whose output, by its shape alone, is a grid of ``example``'s input,
    in the order they finish in a forward pass (each with its first reading; not proven)."""
    size = (int(example.shape[-2]), int(example.shape[-1]))
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in model.named_modules():
        if name and not isinstance(module, _SKIPPED):
            def record(_m, _a, out, name=name):
                if isinstance(out, torch.Tensor):
                    shapes[name] = tuple(out.shape)

            handles.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    found = []
    for name, shape in shapes.items():
        readings = [LayerGrid(name, lay, *r) for lay in LAYOUTS for r in spatial_grids(shape, size, lay)]
        if readings:
            found.append(readings[0])
    return found


def candidate_layers(model: nn.Module, example: torch.Tensor, limit: int = SHOWN_CANDIDATES,
                     layout: str = "auto") -> list[LayerGrid]:
    """Up to ``limit`` layers that :func:`inspect_layer` proves, nearest the output first
    (a known family's known-good layer before the others); at most ``MAX_SCAN`` are tried."""
    known = known_layer(model)
    prefer = known[1] if known is not None else None
    names = ([known[0]] if known is not None else []) + [g.name for g in reversed(grid_shaped_layers(model, example))]
    found = []
    for name in list(dict.fromkeys(names))[:MAX_SCAN]:
        try:
            found.append(inspect_layer(model, name, example, layout, prefer))
        except ValueError:
            continue
        if len(found) >= limit:
            break
    return found


def choose_layer(model: nn.Module, example: torch.Tensor, target_layer: Optional[str] = None,
                 layout: str = "auto") -> LayerGrid:
    """The layer to explain, proven by :func:`inspect_layer`.

    ``target_layer`` (a dotted name) when given; else the known-good layer of the
    model's family (:func:`tsexplain.attr.layers.known_layer`, wrappers seen
    through); else the last layer, in forward order, that passes. ``layout`` as
    in :func:`inspect_layer` (``auto``: the family's layout first).

    Raises :class:`LayerChoiceError` naming the proven candidates when none passes.
    """
    known = known_layer(model)
    if target_layer or known is not None:
        name = target_layer or known[0]
        try:
            return inspect_layer(model, name, example, layout, known[1] if known is not None else None)
        except ValueError as exc:
            where = "" if target_layer else f"the known-good layer of {type(model).__name__}: "
            raise _with_candidates(f"{where}{exc}", model, example) from None
    found = candidate_layers(model, example, 1, layout)
    if found:
        return found[0]
    raise _with_candidates(f"no layer with a spatial feature map found in {type(model).__name__}", model, example, [])


def _with_candidates(message: str, model: nn.Module, example: torch.Tensor,
                     candidates: Optional[list[LayerGrid]] = None) -> LayerChoiceError:
    try:
        if candidates is None:
            candidates = candidate_layers(model, example)
        shaped = len(grid_shaped_layers(model, example))
    except Exception as exc:  # the message must still come out; say why the list is missing
        return LayerChoiceError(f"{message} (no candidate list: the probe failed: {exc})", [])
    size = f"{example.shape[-2]}x{example.shape[-1]}"
    if not candidates:
        found = (f"{shaped} layers output a grid of a {size} input by their shape, none passes the checks"
                 if shaped else f"no layer outputs a grid of a {size} input")
        return LayerChoiceError(f"{message}; {found}", [])
    return LayerChoiceError(
        f"{message}; layers that pass (nearest the output first): {', '.join(map(str, candidates))}", candidates)


def _named(model: nn.Module, layer: Union[str, nn.Module]) -> tuple[str, nn.Module]:
    if isinstance(layer, str):
        return layer, get_layer(model, layer)
    for name, module in model.named_modules():
        if module is layer:
            return name, module
    raise ValueError(f"the layer is not a module of {type(model).__name__}")


def _layouts(layout: str, prefer: Optional[str]) -> tuple[str, ...]:
    if layout != "auto":
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; known: {['auto', *LAYOUTS]}")
        return (layout,)
    return tuple(dict.fromkeys(([prefer] if prefer in LAYOUTS else []) + list(LAYOUTS)))


def _reading(grid: LayerGrid) -> str:
    return str(grid).split(" (", 1)[1].rstrip(")")


class _Probe:
    """One forward pass of the probe with autograd on from the input, the layer's
    output captured (its last call); gradients are taken from it on demand."""

    def __init__(self, model: nn.Module, layer: nn.Module, example: torch.Tensor):
        self.model, self.layer, self.example = model, layer, example
        self.output = self.logits = self.input = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "_Probe":
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            self._run()
            self._stack = stack.pop_all()
        return self

    def _run(self) -> None:
        def capture(_m, _a, out):
            self.output = out
            # A copy for the rest of the model, so later in-place ops leave the capture as it was.
            return out.clone() if isinstance(out, torch.Tensor) else out

        handle = self.layer.register_forward_hook(capture)
        try:
            self.input = self.example.detach().clone().requires_grad_(True)
            self.logits = self.model(self.input)
        finally:
            handle.remove()
        if not isinstance(self.logits, torch.Tensor) or self.logits.dim() != 2:
            raise ValueError(f"the model must return [N, K] logits, got {type(self.logits).__name__} "
                             f"{list(getattr(self.logits, 'shape', []))}")

    def __exit__(self, *exc) -> None:
        self.output = self.logits = self.input = None
        self._stack.close()

    def _grad(self, value: torch.Tensor, wrt: torch.Tensor) -> Optional[torch.Tensor]:
        if not wrt.requires_grad or not value.requires_grad:
            return None
        (grad,) = torch.autograd.grad(value, wrt, retain_graph=True, allow_unused=True)
        return grad

    def score_gradient(self) -> Optional[torch.Tensor]:
        """Gradient of a fixed random mix of the logits at the layer's output (``None``: not connected)."""
        weights = _random(self.logits.shape[1], self.logits)
        return self._grad((self.logits.float() * weights).sum(), self.output)

    def centroid(self, value: torch.Tensor) -> Optional[tuple[float, float]]:
        """Centroid ``(y, x)``, as fractions of the input's sides, of ``|d value / d input|``."""
        grad = self._grad(value, self.input)
        if grad is None:
            return None
        weight = grad.detach().float().abs().sum(dim=(0, 1))
        total = weight.sum()
        if not total > 0:
            return None
        height, width = weight.shape
        ys = (torch.arange(height, device=weight.device) + 0.5) / height
        xs = (torch.arange(width, device=weight.device) + 0.5) / width
        return float((weight.sum(1) * ys).sum() / total), float((weight.sum(0) * xs).sum() / total)


def _random(count: int, like: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(count, generator=generator).to(device=like.device, dtype=torch.float32)


def _probabilities(grid: LayerGrid, output: torch.Tensor) -> Optional[str]:
    """Rows that are probability distributions along the grid's width are attention
    weights (``[N, heads, queries, keys]``), not features."""
    if grid.layout != "nchw":
        return None
    values = output.detach().float()
    if bool((values >= 0).all()) and bool(torch.allclose(values.sum(-1), torch.ones(()), atol=1e-4)):
        return "its rows are probability distributions (a softmax: attention weights), not features"
    return None


def _no_gradient(grid: LayerGrid, gradient: torch.Tensor) -> Optional[str]:
    total = float(gradient.detach().abs().max())
    cells = float(grid.to_grid(gradient.detach()).abs().max())
    if total > 0 and cells <= 1e-6 * total:
        return (f"its cells get no gradient, only its first {grid.prefix_tokens} token(s) do: the classifier "
                "reads the class token alone after this layer (take an earlier block's norm)")
    return None


def _localisation(probe: _Probe, grid: LayerGrid) -> tuple[Optional[tuple[float, float]], Optional[str]]:
    """((rows follow y, columns follow x), refusal reason or None)."""
    cells = grid.to_grid(probe.output)[0].float()  # [C, h, w]
    mixed = (cells * _random(cells.shape[0], cells)[:, None, None]).sum(0)
    shifts = {}  # axis -> (along its own input axis, along the other), as a fraction of the ideal
    for axis, first, last, size in (("rows", mixed[0, :], mixed[-1, :], grid.height),
                                    ("columns", mixed[:, 0], mixed[:, -1], grid.width)):
        if size < 2:
            continue
        start, end = probe.centroid(first.sum()), probe.centroid(last.sum())
        ideal = (size - 1) / size
        if start is None or end is None:
            shifts[axis] = (0.0, 0.0)
            continue
        along = (end[0] - start[0]) if axis == "rows" else (end[1] - start[1])
        across = (end[1] - start[1]) if axis == "rows" else (end[0] - start[0])
        shifts[axis] = (along / ideal, across / ideal)
    measured = [abs(v) for pair in shifts.values() for v in pair]
    strength = max(measured, default=0.0)
    follow = (round(shifts.get("rows", (0.0,))[0], 3), round(shifts.get("columns", (0.0,))[0], 3))
    if strength >= LOCALISED:
        for axis, (along, across) in shifts.items():
            where = "down" if axis == "rows" else "across"
            if along < AXIS_SHARE * strength:
                return follow, (f"its {axis} do not run {where} the input (shift {along:+.2f} against "
                                f"{strength:.2f} elsewhere): not a grid of the image")
            if abs(across) > CROSS_SHARE * along:
                return follow, (f"its {axis} run {where} and sideways alike (shifts {along:+.2f}, {across:+.2f}), "
                                "as tokens in reading order do: not a grid of the image")
    return follow, None
