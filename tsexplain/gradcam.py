"""Grad-CAM fused with the prediction forward.

One forward pass gives both the logits of every row and the Grad-CAM maps of the
rows to explain. The layers before the target layer run without autograd; the
graph is recorded only from the target layer's output on, and the backward pass
computes gradients for that activation alone (no parameter gradients).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn


@dataclass
class GradCamOutput:
    """What :meth:`GradCAM.attribute` returns.

    Attributes:
        logits: ``[N, K]`` logits of every input row, detached.
        heatmaps: ``[M, h, w]`` maps in [0, 1] for the ``M`` explained rows, in the
            order of ``rows``; each map is min-max normalised (all zeros when the
            class has no positive evidence at this layer).
        targets: the class index explained for each explained row.
    """

    logits: torch.Tensor
    heatmaps: torch.Tensor
    targets: list[int]


class GradCAM:
    """Grad-CAM (Selvaraju et al., 2017) on one layer of a classifier.

    Args:
        model: a classifier returning ``[N, K]`` logits, in eval mode.
        layer: the module whose output feature map ``[N, C, h, w]`` is explained.
            If it runs more than once in a forward pass, its last call is used.
    """

    def __init__(self, model: nn.Module, layer: nn.Module):
        self.model = model
        self.layer = layer

    def attribute(
        self,
        inputs: torch.Tensor,
        target: Optional[Sequence[Optional[int]]] = None,
        rows: Optional[Sequence[int]] = None,
    ) -> GradCamOutput:
        """Run the model once and explain the chosen rows.

        Args:
            inputs: ``[N, C, H, W]`` batch, already on the model's device.
            target: one entry per explained row: a class index, or ``None`` for the
                predicted class. ``None`` alone means the predicted class for all.
            rows: indices of the rows to explain (default: all). The other rows
                only get logits.

        Must not be called under ``torch.inference_mode()``. Leaves no hooks and no
        autograd state behind, and restores the caller's grad mode.
        """
        rows = list(range(inputs.shape[0])) if rows is None else list(rows)
        target = [None] * len(rows) if target is None else list(target)
        if len(target) != len(rows):
            raise ValueError(f"{len(target)} targets for {len(rows)} explained rows")
        if torch.is_inference_mode_enabled():
            raise RuntimeError("Grad-CAM cannot run under torch.inference_mode()")

        captured: list[torch.Tensor] = []

        def start_graph_here(_module, _args, output):
            if not isinstance(output, torch.Tensor) or output.dim() != 4:
                raise TypeError(
                    f"target layer output must be a [N, C, h, w] tensor, got "
                    f"{type(output).__name__} {tuple(getattr(output, 'shape', ()))}"
                )
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
                return GradCamOutput(logits.detach(), activation.new_zeros((0,) + activation.shape[2:]), [])
            row_index = torch.tensor(rows, device=logits.device)
            chosen = logits.detach()[row_index].argmax(dim=1).tolist()
            targets = [c if t is None else int(t) for t, c in zip(target, chosen)]
            scores = logits[row_index, torch.tensor(targets, device=logits.device)]
            (gradient,) = torch.autograd.grad(scores.sum(), activation)
        finally:
            handle.remove()
            torch.set_grad_enabled(grad_was_enabled)

        with torch.no_grad():
            acts = activation.detach()[row_index]
            grads = gradient[row_index]
            weights = grads.mean(dim=(2, 3), keepdim=True)
            cams = torch.relu((weights * acts).sum(dim=1))
            heatmaps = normalize_maps(cams.float())
        return GradCamOutput(logits.detach(), heatmaps, targets)


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each ``[h, w]`` map of a ``[M, h, w]`` stack to [0, 1]."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values[:, None, None]
    span = (flat.max(dim=1).values[:, None, None] - low)
    return torch.where(span > 0, (maps - low) / span.clamp_min(1e-12), torch.zeros_like(maps))
