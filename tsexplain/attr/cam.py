"""Class activation maps (Grad-CAM, Grad-CAM++, LayerCAM) fused with the prediction forward.

One forward pass gives both the logits of every row and the maps of the rows to
explain. The layers before the target layer run without autograd; the graph is
recorded only from the target layer's output on, and the backward pass computes
gradients for that activation alone (no parameter gradients). The three methods
differ only in how they weigh the captured activation ``A`` and gradient ``G``
(``[C, h, w]`` per row), so a batch mixing them still needs one pass:

- ``gradcam``: ``relu(sum_c mean_hw(G_c) * A_c)`` (Selvaraju et al., 2017).
- ``gradcam++`` (Chattopadhay et al., 2018): weights ``sum_hw(relu(G) * alpha)``
  with ``alpha = G^2 / (2 G^2 + sum_hw(A) * G^3)`` (0 where ``G = 0``). This is the
  paper's closed form for an exponential score ``exp(S)``, whose second and third
  derivatives become powers of the first-order gradient when ``S`` is piecewise
  linear in ``A``; no second-order autograd is run. Same formula as
  pytorch-grad-cam's ``GradCAMPlusPlus`` (with its ``eps = 1e-6``).
- ``layercam`` (Jiang et al., 2021): ``relu(sum_c relu(G_c) * A_c)``, per position.

With a ``contrast`` class the score is ``logit[target] - logit[contrast]``: the map
answers "why target rather than contrast". Grad-CAM's pre-ReLU map (``raw``) is
linear in the score's gradient, so it equals the target's raw map minus the
contrast's; the ReLU, Grad-CAM++'s weights and LayerCAM's gradient ReLU are not
linear, so for them it is a map of the difference, not a difference of maps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .layers import grid_reshape
from .names import CAM_METHODS
GRADCAM_PP_EPS = 1e-6


@dataclass
class GradCamOutput:
    """What :meth:`GradCAM.attribute` returns.

    Attributes:
        logits: ``[N, K]`` logits of every input row, detached.
        heatmaps: ``[M, h, w]`` maps in [0, 1] for the ``M`` explained rows, in the
            order of ``rows``; each map is min-max normalised (all zeros when the
            class has no positive evidence at this layer).
        targets: the class index explained for each explained row.
        raw: ``[M, h, w]`` the maps before the final ReLU and normalisation.
        contrasts: the contrast class of each explained row (``None``: none).
        methods: the method used for each explained row.
    """

    logits: torch.Tensor
    heatmaps: torch.Tensor
    targets: list[int]
    raw: Optional[torch.Tensor] = None
    contrasts: Optional[list] = None
    methods: Optional[list] = None


def gradcam_map(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Pre-ReLU Grad-CAM maps ``[M, h, w]`` from activations and gradients ``[M, C, h, w]``."""
    weights = grads.mean(dim=(2, 3), keepdim=True)
    return (weights * acts).sum(dim=1)


def gradcam_pp_map(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Pre-ReLU Grad-CAM++ maps (the closed form of the module docstring)."""
    grads_2 = grads.pow(2)
    grads_3 = grads_2 * grads
    sum_acts = acts.sum(dim=(2, 3), keepdim=True)
    alpha = grads_2 / (2 * grads_2 + sum_acts * grads_3 + GRADCAM_PP_EPS)
    alpha = torch.where(grads != 0, alpha, torch.zeros_like(alpha))
    weights = (torch.relu(grads) * alpha).sum(dim=(2, 3), keepdim=True)
    return (weights * acts).sum(dim=1)


def layercam_map(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Pre-ReLU LayerCAM maps: positive gradients weigh each position."""
    return (torch.relu(grads) * acts).sum(dim=1)


CAM_WEIGHTING: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "gradcam": gradcam_map,
    "gradcam++": gradcam_pp_map,
    "layercam": layercam_map,
}


class GradCAM:
    """Grad-CAM (Selvaraju et al., 2017) on one layer of a classifier.

    Args:
        model: a classifier returning ``[N, K]`` logits, in eval mode.
        layer: the module whose output is explained. If it runs more than once
            in a forward pass, its last call is used.
        layout: how ``layer`` lays out its output: ``nchw`` (CNNs), ``nhwc``
            (Swin) or ``tokens`` (ViT: ``[N, 1 + h*w, C]`` with the class token
            first), or the :class:`~tsexplain.attr.layers.LayerGrid` that
            :func:`~tsexplain.attr.layer_choice.inspect_layer` proved (its prefix
            tokens and grid shape). Maps are computed on the ``[N, C, h, w]`` grid.
    """

    method = "gradcam"

    def __init__(self, model: nn.Module, layer: nn.Module, layout: str = "nchw"):
        self.model = model
        self.layer = layer
        self.layout = layout
        self.reshape = grid_reshape(layout)

    def attribute(
        self,
        inputs: torch.Tensor,
        target: Optional[Sequence[Optional[int]]] = None,
        rows: Optional[Sequence[int]] = None,
        contrast: Optional[Sequence[Optional[int]]] = None,
        methods: Optional[Sequence[str]] = None,
    ) -> GradCamOutput:
        """Run the model once and explain the chosen rows.

        Args:
            inputs: ``[N, C, H, W]`` batch, already on the model's device.
            target: one entry per explained row: a class index, or ``None`` for the
                predicted class. ``None`` alone means the predicted class for all.
            rows: indices of the rows to explain (default: all). The other rows
                only get logits.
            contrast: one entry per explained row: a class whose logit is
                subtracted from the target's (``None``: no contrast).
            methods: one of ``CAM_METHODS`` per explained row (default: this
                class's method for all); rows share the one forward and backward pass.

        Must not be called under ``torch.inference_mode()``. Leaves no hooks and no
        autograd state behind, and restores the caller's grad mode.
        """
        rows = list(range(inputs.shape[0])) if rows is None else list(rows)
        target = [None] * len(rows) if target is None else list(target)
        contrast = [None] * len(rows) if contrast is None else list(contrast)
        methods = [self.method] * len(rows) if methods is None else list(methods)
        if not len(target) == len(contrast) == len(methods) == len(rows):
            raise ValueError(f"{len(target)} targets, {len(contrast)} contrasts and {len(methods)} methods "
                             f"for {len(rows)} explained rows")
        unknown = sorted(set(methods) - set(CAM_METHODS))
        if unknown:
            raise ValueError(f"unknown CAM method(s) {unknown}; known: {list(CAM_WEIGHTING)}")
        if torch.is_inference_mode_enabled():
            raise RuntimeError("Grad-CAM cannot run under torch.inference_mode()")

        captured: list[torch.Tensor] = []

        def start_graph_here(_module, _args, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"target layer output must be a tensor, got {type(output).__name__}")
            self.reshape(output)  # fail early on a layout mismatch
            leaf = output.detach().requires_grad_(True)
            captured[:] = [leaf]
            torch.set_grad_enabled(True)
            # A non-leaf copy, so in-place layers after this one stay legal.
            return leaf.clone()

        grad_was_enabled = torch.is_grad_enabled()
        handle = self.layer.register_forward_hook(start_graph_here)
        try:
            torch.set_grad_enabled(False)
            logits = self.model(inputs)
            if not captured:
                raise RuntimeError("the target layer did not run in the forward pass")
            activation = captured[0]
            if not rows:
                empty = self.reshape(activation.detach()).new_zeros((0,) + self.reshape(activation).shape[2:])
                return GradCamOutput(logits.detach(), empty, [], empty.clone(), [], [])
            device = logits.device
            row_index = torch.tensor(rows, device=device)
            chosen = logits.detach()[row_index].argmax(dim=1).tolist()
            targets = [c if t is None else int(t) for t, c in zip(target, chosen)]
            scores = logits[row_index, torch.tensor(targets, device=device)]
            contrasted = [k for k, c in enumerate(contrast) if c is not None]
            if contrasted:
                index = torch.tensor(contrasted, device=device)
                against = logits[row_index[index], torch.tensor([int(contrast[k]) for k in contrasted], device=device)]
                scores = scores.index_add(0, index, -against)
            (gradient,) = torch.autograd.grad(scores.sum(), activation)
        finally:
            handle.remove()
            torch.set_grad_enabled(grad_was_enabled)

        with torch.no_grad():
            acts = self.reshape(activation.detach()[row_index]).float()
            grads = self.reshape(gradient[row_index]).float()
            raw = acts.new_empty((len(rows),) + acts.shape[2:])
            for method in dict.fromkeys(methods):
                picked = torch.tensor([k for k, m in enumerate(methods) if m == method], device=acts.device)
                raw[picked] = CAM_WEIGHTING[method](acts[picked], grads[picked])
            heatmaps = normalize_maps(torch.relu(raw))
        contrasts = [None if c is None else int(c) for c in contrast]
        return GradCamOutput(logits.detach(), heatmaps, targets, raw, contrasts, methods)


class GradCAMPlusPlus(GradCAM):
    """Grad-CAM++ (Chattopadhay et al., 2018); see the module docstring for the formula."""

    method = "gradcam++"


class LayerCAM(GradCAM):
    """LayerCAM (Jiang et al., 2021): positive gradients weigh each position."""

    method = "layercam"


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each ``[h, w]`` map of a ``[M, h, w]`` stack to [0, 1]."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values[:, None, None]
    span = (flat.max(dim=1).values[:, None, None] - low)
    # Divide by the span itself however small (maps of tiny magnitude still reach 1).
    return torch.where(span > 0, (maps - low) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(maps))
