"""ImageExplainer: TorchServe's image classifier with Grad-CAM explanations.

``/predictions`` answers as the stock ``image_classifier`` does (``{label: prob}``
for the top k). ``/explanations`` answers
``{"predictions": [...], "explanation": {...}}`` with a Grad-CAM map computed on
the model the worker loaded, in the same forward pass as the prediction.
Each request of a batch is decided and answered on its own (``ExplainerFlow``).
"""
from __future__ import annotations

import base64
import logging
import os
import time

import torch
import torch.nn.functional as F
from ts.torch_handler.image_classifier import ImageClassifier

from explain_common import ExplainerFlow, Prepared, answer, answer_error, envelope, explanation_failed, ranked_predictions
from tsexplain.errors import ConfigError, RequestError
from tsexplain.gradcam import GradCAM
from tsexplain.images import decode_image, resize_map, render_overlay
from tsexplain.layers import feature_map_shape, find_target_layer, get_layer
from tsexplain.models import build_torchvision_classifier
from tsexplain.parsing import parse_image_request, resolve_target
from tsexplain.settings import ImageExplainSettings, ImageModelSettings, load_section

logger = logging.getLogger(__name__)


class ImageExplainer(ExplainerFlow, ImageClassifier):
    """Image classifier handler whose ``/explanations`` route serves Grad-CAM."""

    def initialize(self, context):
        config = getattr(context, "model_yaml_config", None) or {}
        name = context.model_name
        self.model_settings = load_section(ImageModelSettings, config.get("handler"), name, os.environ)
        self.explain_settings = load_section(ImageExplainSettings, config.get("explain"), name, os.environ)
        self.preprocessing = self.model_settings.preprocessing()
        self.topk = self.model_settings.top_k
        self._init_access()
        super().initialize(context)

        width, height = self.preprocessing.input_size(1024, 1024)
        example = torch.zeros(1, 3, height, width, device=self.device)
        with torch.inference_mode():
            num_classes = self.model(example).shape[1]
        self.labels = [(self.mapping or {}).get(str(i), str(i)) for i in range(num_classes)]
        self.topk = min(self.topk, num_classes)
        self.layer_name = self.explain_settings.target_layer or find_target_layer(self.model, example)
        layer = get_layer(self.model, self.layer_name)
        shape = feature_map_shape(self.model, layer, example)
        if len(shape) != 4:
            raise ConfigError(f"target layer {self.layer_name!r} outputs shape {shape}, not [N, C, h, w]")
        self.gradcam = GradCAM(self.model, layer)
        logger.info("Grad-CAM on %s: %dx%d cells for %dx%d input", self.layer_name, shape[2], shape[3], height, width)

    def _load_pickled_model(self, model_dir, model_file, model_pt_path):
        architecture = self.model_settings.architecture
        if not architecture:
            return super()._load_pickled_model(model_dir, model_file, model_pt_path)
        return build_torchvision_classifier(
            architecture, self.model_settings.num_classes or 1000, model_pt_path, self.device
        )

    def _parse(self, row):
        return parse_image_request(row)

    def _prepare(self, idx, request) -> Prepared:
        if request.method not in (None, "gradcam"):
            raise RequestError(f"unknown method {request.method[:32]!r}; available: ['gradcam']", "unknown_method")
        target = resolve_target(request.target, self.labels)
        image = decode_image(request.image, self.model_settings.max_image_pixels)
        return Prepared(idx, request, False, target, self.preprocessing(image), image)

    def _answer_batch(self, items: list[Prepared], answers: list) -> None:
        batch = torch.stack([item.inputs for item in items]).to(self.device)
        explained = [k for k, item in enumerate(items) if item.explain]
        heatmaps, targets, failure, late = {}, {}, None, {}
        explain_ms = 0.0
        logits = None
        if explained:
            began = time.perf_counter()
            try:
                self.inject_fault()
                done, out, late = self.within_deadlines(
                    explained, items, lambda rows: self.gradcam.attribute(batch, [items[k].target for k in rows], rows))
                if out is not None:
                    logits = out.logits
                    heatmaps = dict(zip(done, out.heatmaps))
                    targets = dict(zip(done, out.targets))
            except Exception as exc:  # the explanation fails alone; predictions go on
                logger.error("Grad-CAM failed: %s", type(exc).__name__)
                self.count("ExplanationsFailed", len(explained))
                failure = explanation_failed(exc)
            explain_ms = (time.perf_counter() - began) * 1000
        if logits is None:  # no explanation ran to the end
            logits = self.inference(batch)
        probabilities = F.softmax(logits.float(), dim=1).cpu()

        for k, item in enumerate(items):
            ranked = ranked_predictions(probabilities[k], self.labels, item.request.top_k or self.topk)
            if item.explain and (failure is not None or k in late):
                answers[item.idx] = answer_error(self.context, item.idx, late.get(k, failure))
            elif item.explain:
                began = time.perf_counter()
                explanation = self._explanation(item, heatmaps[k], targets[k])
                explanation["elapsed_ms"] = round(explain_ms + (time.perf_counter() - began) * 1000, 2)
                self.record_explanation(explanation["elapsed_ms"], layer=self.layer_name)
                answers[item.idx] = answer(self.context, item.idx, envelope(ranked, explanation))
            else:
                answers[item.idx] = self.answer_prediction(item, ranked)

    def _explanation(self, item: Prepared, heatmap: torch.Tensor, target: int) -> dict:
        settings = self.explain_settings
        outputs = item.request.outputs if item.request.outputs is not None else tuple(settings.outputs)
        result = {
            "method": "gradcam",
            "target": {"index": target, "label": self.labels[target]},
            "layer": self.layer_name,
        }
        heatmap = heatmap.detach().cpu()
        if "heatmap" in outputs:
            size = item.request.heatmap_size or settings.heatmap_size
            values = heatmap
            if size == "input":
                values = resize_map(heatmap, item.inputs.shape[1], item.inputs.shape[2])
            rounded = [[round(v, settings.heatmap_decimals) for v in row] for row in values.tolist()]
            result["heatmap"] = {"shape": list(values.shape), "values": rounded}
        if "overlay_png" in outputs:
            box = self.preprocessing.crop_box(*item.original.size)
            png = render_overlay(item.original, heatmap, box, settings.overlay_alpha)
            result["overlay_png"] = base64.b64encode(png).decode("ascii")
        return result
