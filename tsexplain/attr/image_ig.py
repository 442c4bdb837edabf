"""Integrated Gradients for image classifiers, with compact maps.

- ``integrated_gradients``: captum's ``IntegratedGradients`` on the input pixels,
  the method of TorchServe's stock ``/explanations`` (which answers the full
  ``[3, H, W]`` attribution tensor as JSON, megabytes per image). Here steps run
  in chunks of ``internal_batch_size`` rows, and the map is summed over colour
  channels and sum-pooled to a small grid.
- ``layer_ig``: captum's ``LayerIntegratedGradients`` on a conv layer (or a ViT /
  Swin block, reshaped to a grid like the CAM methods), summed over channels.

Both explain the target **logit** (``logit[target] - logit[contrast]`` with a
contrast class) from a baseline input of zeros (the mean colour, after
normalisation), and report captum's convergence delta: attributions over the
whole input or layer add up to ``F(x) - F(baseline)`` within ``delta``. The
attributed function is linear in the target's logit, so a contrastive attribution
equals the target's minus the contrast's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, LayerIntegratedGradients
from torch import nn

from .layers import grid_reshape


@dataclass
class IGOutput:
    """What :meth:`ImageIG.attribute` returns.

    Attributes:
        maps: ``[M, h, w]`` channel-summed attributions (signed, in logit units).
        targets: the class index explained for each row.
        contrasts: the contrast class of each row (``None``: none).
        delta: ``[M]`` captum's convergence delta, ``sum(attributions) - (F(x) - F(baseline))``.
        gap: ``[M]`` ``F(x) - F(baseline)``, the amount the attributions share out.
    """

    maps: torch.Tensor
    targets: list[int]
    contrasts: list
    delta: torch.Tensor
    gap: torch.Tensor


class ImageIG:
    """Integrated Gradients on an image classifier's input or on one of its layers.

    Args:
        model: a classifier returning ``[N, K]`` logits, in eval mode.
        layer: ``None`` for input attributions (``integrated_gradients``), else the
            module whose output is attributed (``layer_ig``).
        layout: the layer's output layout (``nchw``, ``nhwc``, ``tokens`` or a
            ``LayerGrid``); see :class:`tsexplain.attr.cam.GradCAM`. For ``tokens``
            the prefix tokens' share is left out of the map (it stays in the
            convergence delta).
    """

    def __init__(self, model: nn.Module, layer: Optional[nn.Module] = None, layout: str = "nchw"):
        self.model = model
        self.layer = layer
        self.method = "integrated_gradients" if layer is None else "layer_ig"
        self.reshape = grid_reshape(layout) if layer is not None else None
        if layer is None:
            self._captum = IntegratedGradients(self._score)
        else:
            self._captum = LayerIntegratedGradients(self._score, layer)

    def _score(self, inputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # weights: [N, K] with +1 at the target and -1 at the contrast.
        # Layer IG replaces the layer's output by a leaf that requires grad; a hook
        # registered after captum's hands the rest of the model a copy, so in-place
        # ops after the layer (DenseNet's ReLU) stay legal.
        handle = self.layer.register_forward_hook(_copy_output) if self.layer is not None else None
        try:
            return (self.model(inputs) * weights).sum(dim=1)
        finally:
            if handle is not None:
                handle.remove()

    def attribute(
        self,
        inputs: torch.Tensor,
        target: Sequence[int],
        contrast: Optional[Sequence[Optional[int]]] = None,
        n_steps: int = 32,
        internal_batch_size: Optional[int] = None,
        num_classes: Optional[int] = None,
        method: str = "gausslegendre",
    ) -> IGOutput:
        """Attribute ``logit[target] - logit[contrast]`` of every row of ``inputs``.

        Args:
            inputs: ``[M, C, H, W]`` rows to explain, on the model's device.
            target: a class index per row (already resolved: no ``None``).
            contrast: a class index or ``None`` per row.
            n_steps: integration steps (captum's ``n_steps``).
            internal_batch_size: rows (input, step) per forward/backward pass;
                bounds memory. ``None``: all ``M * n_steps`` at once.
            num_classes: the model's number of outputs (default: one forward to find it).
            method: captum's integration rule.
        """
        rows = inputs.shape[0]
        contrast = [None] * rows if contrast is None else list(contrast)
        if not len(target) == len(contrast) == rows:
            raise ValueError(f"{len(target)} targets and {len(contrast)} contrasts for {rows} rows")
        if torch.is_inference_mode_enabled():
            raise RuntimeError("Integrated Gradients cannot run under torch.inference_mode()")
        if num_classes is None:
            with torch.no_grad():
                num_classes = self.model(inputs[:1]).shape[1]
        weights = torch.zeros(rows, num_classes, device=inputs.device, dtype=inputs.dtype)
        weights[torch.arange(rows), torch.tensor(list(target))] = 1
        for row, other in enumerate(contrast):
            if other is not None:
                weights[row, int(other)] -= 1
        baselines = torch.zeros_like(inputs)
        with torch.enable_grad():
            attributions, delta = self._captum.attribute(
                inputs, baselines=baselines, additional_forward_args=(weights,), n_steps=n_steps,
                method=method, internal_batch_size=internal_batch_size, return_convergence_delta=True,
            )
            with torch.no_grad():
                gap = self._score(inputs, weights) - self._score(baselines, weights)
        attributions = attributions.detach().float()
        grid = attributions if self.reshape is None else self.reshape(attributions)
        maps = grid.sum(dim=1)
        return IGOutput(maps, [int(t) for t in target], [None if c is None else int(c) for c in contrast],
                        delta.detach().float().reshape(-1), gap.detach().float())


def _copy_output(_module, _args, output):
    return output.clone() if isinstance(output, torch.Tensor) else output


def sum_pool(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pool ``[M, H, W]`` maps to ``[M, height, width]`` cells holding the sum of
    their pixels (exact when the sizes divide; otherwise adaptive cells scaled to
    the mean cell area). Sums are kept, so the map still adds up to the total."""
    if maps.shape[-2:] == (height, width):
        return maps
    pooled = F.adaptive_avg_pool2d(maps[:, None].float(), (height, width))[:, 0]
    return pooled * (maps.shape[-2] * maps.shape[-1] / (height * width))
