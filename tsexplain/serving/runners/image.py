"""Image classifiers: decode and preprocess, predict with the CAM maps fused into the
same forward, explain with Integrated Gradients, render heatmaps and overlays."""
from __future__ import annotations

import base64
import io
import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from PIL import Image

from ...attr.cam import GradCAM
from ...attr.image_ig import ImageIG, sum_pool
from ...attr.layer_choice import choose_layer, probe_input
from ...attr.layers import get_layer
from ...attr.names import CAM_METHODS
from ..errors import ConfigError
from ..images import decode_image, render_overlay, resize_map
from ..models import is_scripted
from ..schema import IMAGE
from ..settings import ModelSettings
from .base import Item, Runner

logger = logging.getLogger(__name__)
PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
HOOK_METHODS = CAM_METHODS + ("layer_ig",)  # they hook a layer: not on TorchScript models
SCRIPTED_CELL = 16  # pixels per heatmap cell of a TorchScript model's feature-size maps


@dataclass
class ImageInput:
    """A request's image: as decoded, after resize and crop, and as the model's tensor."""

    original: Image.Image  # decoded, EXIF rotation applied
    cropped: Image.Image  # what the model sees
    tensor: Optional[torch.Tensor] = None  # [C, H, W] normalised, once the batch is made
    data: bytes = b""  # the bytes it came from (the cache key's)
    answered_map: Optional[tuple] = None  # (values, extra heatmap fields) as rendered


class ImageRunner(Runner):
    """The image steps of the flow for a classifier returning ``[N, K]`` logits.

    Args:
        model: the model predictions run on (the worker's).
        explained_model: the model explanations run on: ``model`` itself, or with
            concurrent explanations a copy sharing its weights.
        mapping: ``{"0": "label", ...}`` (the MAR's index_to_name.json); classes it does not
            name are labelled by their index.
        settings: the model's settings.
        device: where the model is.

    Raises:
        ConfigError: no usable target layer: the configured or automatic one is not a
            spatial grid of the input (:func:`tsexplain.attr.layer_choice.choose_layer`);
            the message lists the candidates.
    """

    modality = IMAGE
    fused_methods = frozenset(CAM_METHODS)
    explanation_fields = ("n_steps", "outputs", "heatmap_size")
    log_fields = ("layer",)

    def __init__(self, model: torch.nn.Module, explained_model: torch.nn.Module, mapping: Optional[dict],
                 settings: ModelSettings, device: torch.device):
        self.model = model
        self.settings = settings
        self.device = device
        handler, explain = settings.handler, settings.explain
        self.preprocessing = handler.preprocessing()
        width, height = self.preprocessing.input_size(1024, 1024)
        example = probe_input(height, width, device=device)
        with torch.inference_mode():
            num_classes = model(example).shape[1]
        self.labels = [(mapping or {}).get(str(i), str(i)) for i in range(num_classes)]
        if mapping and len(mapping) != num_classes:
            logger.warning("index_to_name.json names %d classes, the model outputs %d", len(mapping), num_classes)
        first = next(model.parameters(), None)  # a model may have no parameters (TorchScript, a fixed filter)
        self.precision = "fp32" if first is None else PRECISION_NAMES.get(first.dtype, "fp32")  # no autocast
        if is_scripted(model):
            self._without_hooks(explained_model, height, width)
            return
        # The layer is proven on the probe (a spatial grid of the input whose cells get
        # gradient and look where they sit), or the model does not load.
        try:
            grid = choose_layer(explained_model, example, explain.target_layer, explain.feature_layout)
        except ValueError as exc:
            raise ConfigError(f"{exc}. Set explain.target_layer to the dotted name of a layer whose output is a "
                              "spatial grid, and explain.feature_layout to its layout (nchw, nhwc or tokens)") from None
        self.layer_name = grid.name
        layer = get_layer(explained_model, grid.name)
        self.feature_size = (grid.height, grid.width)
        self.gradcam = GradCAM(explained_model, layer, grid)
        self.integrated = {"layer_ig": ImageIG(explained_model, layer, grid),
                           "integrated_gradients": ImageIG(explained_model)}
        logger.info("explanations on %s for %dx%d input (localisation %s); methods %s", grid, height, width,
                    grid.localisation, ",".join(explain.methods))

    def _without_hooks(self, explained_model: torch.nn.Module, height: int, width: int) -> None:
        """A TorchScript model: no hooks, so no layer. Input IG works through autograd; the
        CAM methods and layer IG answer ``method_unsupported``. ``feature``-size maps pool
        input IG into cells of ``SCRIPTED_CELL`` pixels (there is no layer grid to take)."""
        self.layer_name = None
        self.feature_size = (max(1, math.ceil(height / SCRIPTED_CELL)), max(1, math.ceil(width / SCRIPTED_CELL)))
        self.gradcam = None
        self.integrated = {"integrated_gradients": ImageIG(explained_model)}
        self.unsupported_methods = {
            method: (f"method {method!r} needs forward hooks on a layer, which a TorchScript model does not "
                     "support; this model serves integrated_gradients (list it in explain.methods), or package "
                     "the eager model (a model file and its state dict) for the CAM methods and layer_ig")
            for method in HOOK_METHODS}
        served = [m for m in self.settings.explain.methods if m not in HOOK_METHODS]
        logger.info("TorchScript model: %dx%d input; served methods %s; %s answer method_unsupported", height, width,
                    ",".join(served) or "none", ",".join(m for m in self.settings.explain.methods if m in HOOK_METHODS)
                    or "no others")

    def prepare(self, item: Item) -> None:
        image = decode_image(item.request.data, self.settings.handler.max_image_pixels)
        item.inputs = ImageInput(image, self.preprocessing.geometry(image), data=item.request.data)

    def cache_input(self, item: Item) -> bytes:
        return item.inputs.data

    def prediction_top_k(self, item: Item) -> int:
        return min(item.options["top_k"], len(self.labels))

    def forward(self, items: list[Item], fused: list[Item]) -> torch.Tensor:
        tensors = self.preprocessing.tensors([item.inputs.cropped for item in items])  # one conversion for the batch
        for item, tensor in zip(items, tensors):
            item.inputs.tensor = tensor
        batch = tensors.to(self.device)
        if fused:  # one forward pass for the predictions and every CAM map of the batch
            position = {id(item): k for k, item in enumerate(items)}
            out = self.gradcam.attribute(batch, [i.target for i in fused], [position[id(i)] for i in fused],
                                         [i.contrast for i in fused], [i.method for i in fused])
            for item, heatmap, target in zip(fused, out.heatmaps, out.targets):
                item.result, item.explained_class = {"heatmap": heatmap}, target
            logits = out.logits
        else:
            with torch.inference_mode():
                logits = self.model(batch)
        return F.softmax(logits.float(), dim=1).cpu()

    def group_key(self, item: Item):
        # CAM maps (concurrent mode, or a stale cache hit) share one pass; IG one per method and step count
        return ("cam",) if item.method in CAM_METHODS else (item.method, item.options["n_steps"])

    def explain(self, items: list[Item]) -> list:
        batch = torch.stack([item.inputs.tensor for item in items]).to(self.device)
        targets = [item.explained_class for item in items]
        contrasts = [item.contrast for item in items]
        method = items[0].method
        if method in CAM_METHODS:
            out = self.gradcam.attribute(batch, targets, None, contrasts, [item.method for item in items])
            return [{"heatmap": heatmap} for heatmap in out.heatmaps]
        explain = self.settings.explain
        out = self.integrated[method].attribute(
            batch, targets, contrasts, n_steps=items[0].options["n_steps"],
            internal_batch_size=explain.internal_batch_size, num_classes=len(self.labels),
            method=explain.integration_method)
        return [{"attribution": out.maps[k], "delta": float(out.delta[k]), "gap": float(out.gap[k])}
                for k in range(len(items))]

    def render(self, item: Item) -> dict:
        settings, options, result = self.settings.explain, item.options, item.result
        target = item.explained_class
        explanation = {"method": item.method, "target": {"index": target, "label": self.labels[target]}}
        explanation["contrast"] = (None if item.contrast is None
                                   else {"index": item.contrast, "label": self.labels[item.contrast]})
        explanation["layer"] = "input" if item.method == "integrated_gradients" else self.layer_name
        input_size = tuple(item.inputs.tensor.shape[1:])
        extra = {}
        if item.method in CAM_METHODS:
            heatmap = result["heatmap"].detach().cpu()
            values = resize_map(heatmap, *input_size) if options["heatmap_size"] == "input" else heatmap
        else:
            # Signed attributions: values in [-1, 1], times `scale` gives logit units per cell.
            attribution = result["attribution"].detach().cpu()
            if item.method == "integrated_gradients" and options["heatmap_size"] == "feature":
                attribution = sum_pool(attribution[None], *self.feature_size)[0]
            if options["heatmap_size"] == "input" and tuple(attribution.shape) != input_size:
                # layer IG's cells read at every pixel: scaled again so that the peak is ±1
                attribution = F.interpolate(attribution[None, None], size=input_size, mode="bilinear",
                                            align_corners=False)[0, 0]
            scale = float(attribution.abs().max())
            values = attribution / scale if scale > 0 else torch.zeros_like(attribution)
            heatmap = values.clamp(min=0)  # the overlay shows the evidence for the target
            extra = {"scale": float(f"{scale:.6g}")}
            absolute = abs(result["delta"])
            explanation.update(
                n_steps=options["n_steps"], integration=settings.integration_method, baseline="zeros",
                convergence_delta={"absolute": absolute, "relative": absolute / max(abs(result["gap"]), 1e-12)})
        item.inputs.answered_map = (values, extra)  # the audit record keeps it even when only the overlay is asked
        if "heatmap" in options["outputs"]:
            explanation["heatmap"] = self._heatmap(values, extra)
        if "overlay_png" in options["outputs"]:
            box = self.preprocessing.crop_box(*item.inputs.original.size)
            png = render_overlay(item.inputs.original, heatmap, box, settings.overlay_alpha)
            explanation["overlay_png"] = base64.b64encode(png).decode("ascii")
        return explanation

    def _heatmap(self, values: torch.Tensor, extra: dict) -> dict:
        rounded = [[round(v, self.settings.explain.heatmap_decimals) for v in row] for row in values.tolist()]
        return {"shape": list(values.shape), "values": rounded, **extra}

    def record_extras(self, item: Item, explanation: dict) -> Optional[dict]:
        if "heatmap" in explanation or item.inputs.answered_map is None:
            return None
        return {"heatmap": self._heatmap(*item.inputs.answered_map)}

    def record_parameters(self, item: Item, explanation: dict) -> dict:
        handler, settings, options = self.settings.handler, self.settings.explain, item.options
        integrates = item.method not in CAM_METHODS
        return {"layer": explanation.get("layer"), "n_steps": options["n_steps"] if integrates else None,
                "integration": settings.integration_method if integrates else None,
                "baseline": explanation.get("baseline"), "precision": self.precision,
                "heatmap_size": options["heatmap_size"], "outputs": list(options["outputs"]),
                "heatmap_decimals": settings.heatmap_decimals, "internal_batch_size": settings.internal_batch_size
                if integrates else None, "resize": handler.resize, "crop": handler.crop, "mean": list(handler.mean),
                "std": list(handler.std), "overlay_alpha": settings.overlay_alpha}

    def input_content_type(self, item: Item) -> str:
        with Image.open(io.BytesIO(item.inputs.data)) as image:  # the header only: it decoded before
            return Image.MIME.get(image.format or "", "application/octet-stream")
