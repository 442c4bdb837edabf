"""ImageExplainer: TorchServe's image classifier with CAM and IG explanations.

``/predictions`` answers as the stock ``image_classifier`` does (``{label: prob}``
for the top k). ``/explanations`` answers
``{"predictions": [...], "explanation": {...}}`` with a map computed on the model
the worker loaded, by the request's method (``explain.methods`` lists those
allowed): Grad-CAM, Grad-CAM++ and LayerCAM in the same forward pass as the
prediction (one pass for all the CAM requests of a batch), Layer IG and input IG
after it. Each request of a batch is decided and answered on its own
(``ExplainerFlow``).
"""
from __future__ import annotations

import base64
import logging
import os
import time
import torch
import torch.nn.functional as F
from ts.torch_handler.image_classifier import ImageClassifier

from explain_common import ExplainerFlow, Prepared, answer, answer_error, envelope, explanation_failed, ranked_rows
from tsexplain.errors import ConfigError, RequestError
from tsexplain.gradcam import GradCAM
from tsexplain.image_ig import ImageIG, sum_pool
from tsexplain.images import decode_image, render_overlay, resize_map
from tsexplain.layers import feature_map_shape, find_layout, find_target_layer, get_layer, grid_reshape
from tsexplain.models import build_torchvision_classifier
from tsexplain.parsing import parse_image_request, resolve_target
from tsexplain.settings import IMAGE_CAM_METHODS, IMAGE_METHODS, ImageExplainSettings, ImageModelSettings, load_section

logger = logging.getLogger(__name__)
IG_METHODS = ("layer_ig", "integrated_gradients")
# TorchServe's loader wants exactly one class defined in a handler module.

class ImageExplainer(ExplainerFlow, ImageClassifier):
    """Image classifier handler whose ``/explanations`` route serves CAM and IG maps."""

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
        settings = self.explain_settings
        self.layer_name = settings.target_layer or find_target_layer(self.model, example)
        explained_model, _ = self._init_concurrency(context, self.model)  # the model, or a view of it
        layer = get_layer(explained_model, self.layer_name)
        layout = find_layout(explained_model) if settings.feature_layout == "auto" else settings.feature_layout
        try:
            shape = feature_map_shape(explained_model, layer, example, grid_reshape(layout))
        except TypeError as exc:
            raise ConfigError(f"target layer {self.layer_name!r} (feature_layout {layout}): {exc}") from None
        if len(shape) != 4:
            raise ConfigError(f"target layer {self.layer_name!r} outputs shape {shape}, not [N, C, h, w]")
        self.feature_size = (shape[2], shape[3])
        self.gradcam = GradCAM(explained_model, layer, layout)
        self.integrated = {"layer_ig": ImageIG(explained_model, layer, layout),
                           "integrated_gradients": ImageIG(explained_model)}
        self._init_cache(context)
        logger.info("explanations on %s (%s): %dx%d cells for %dx%d input; methods %s", self.layer_name, layout,
                    shape[2], shape[3], height, width, ",".join(settings.methods))

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
        settings = self.explain_settings
        method = request.method or settings.method
        if method not in IMAGE_METHODS:
            raise RequestError(f"unknown method {method[:32]!r}; this model allows {list(settings.methods)}",
                               "unknown_method")
        if method not in settings.methods:
            raise RequestError(f"method {method!r} is not allowed for this model; allowed: {list(settings.methods)}",
                               "method_not_allowed", 403)
        if request.n_steps is not None:
            if method not in IG_METHODS:
                raise RequestError(f"'n_steps' applies to {list(IG_METHODS)}, not {method}", "bad_n_steps")
            if request.n_steps > settings.max_n_steps:
                raise RequestError(f"'n_steps' must be an integer in [1, {settings.max_n_steps}]", "bad_n_steps")
        target = resolve_target(request.target, self.labels)
        contrast = resolve_target(request.contrast, self.labels, "contrast")
        if contrast is not None and contrast == target:
            raise RequestError("'contrast' must differ from 'target'", "bad_contrast")
        image = decode_image(request.image, self.model_settings.max_image_pixels)
        # inputs: the resized, cropped image until _answer_batch makes the batch tensor
        return Prepared(idx, request, False, target, self.preprocessing.geometry(image), image, method=method,
                        contrast=contrast)

    def _answer_batch(self, items: list[Prepared], answers: list) -> None:
        inputs = self.preprocessing.tensors([item.inputs for item in items])  # one conversion for the batch
        for item, tensor in zip(items, inputs):
            item.inputs = tensor  # [C, H, W], as _explanation reads it
        batch = inputs.to(self.device)
        explained = [k for k, item in enumerate(items) if item.explain]
        results: dict[int, dict] = {}  # row -> what _explanation renders
        failures: dict[int, RequestError] = {}
        hits, cache_keys, logits = {}, {}, None
        lookup_ms = 0.0
        if explained and self.cache.enabled:  # no forward needed: no target is keyed as "the predicted class"
            began = time.perf_counter()
            for k in explained:
                item = items[k]
                cache_keys[k] = self.explanation_key(item.request.image, item.method, item.target,
                                                     self._output_params(item))
                found = self.cached_explanation(cache_keys[k])
                if found is not None:
                    hits[k] = found
            lookup_ms = (time.perf_counter() - began) * 1000
        pending = [k for k in explained if k not in hits]
        cam_rows = [k for k in pending if items[k].method in IMAGE_CAM_METHODS]
        # one forward pass for the predictions and every CAM map of the batch; with concurrent
        # explanations the maps come after the predictions are answered, in the explanation lane
        late_cam = cam_rows if self.concurrent else []
        if cam_rows and not self.concurrent:
            logits = self._cam(batch, cam_rows, items, {k: items[k].target for k in cam_rows}, results, failures)
        if logits is None:
            logits = self.inference(batch)
        needs_classes = hits or late_cam or any(items[k].method in IG_METHODS for k in pending)
        predicted = logits.argmax(dim=1).tolist() if needs_classes else []
        stale = [k for k in hits if not self.usable_hit(hits[k], items[k].target, predicted[k])]
        for k in cache_keys:
            self.count_cache(k in hits and k not in stale, items[k].method)
        for k in stale:  # computed again, for the class this forward predicts
            del hits[k]
            pending.append(k)
            if items[k].contrast == predicted[k]:
                failures[k] = RequestError("'contrast' is the predicted class; name another class", "bad_contrast")
        stale_cam = [k for k in stale if items[k].method in IMAGE_CAM_METHODS and k not in failures]
        if self.concurrent:
            late_cam = [k for k in late_cam + stale_cam if k not in failures]
        elif stale_cam:
            self._cam(batch, stale_cam, items, {k: predicted[k] for k in stale_cam}, results, failures, fused=False)
        probabilities = F.softmax(logits.float(), dim=1).cpu()
        steps = {k: items[k].request.n_steps or self.explain_settings.n_steps for k in pending}
        integrated = [k for k in pending if items[k].method in IG_METHODS and k not in failures]
        rankings = ranked_rows(probabilities, self.labels, [item.request.top_k or self.topk for item in items])

        def finish(k: int) -> None:
            item = items[k]
            ranked = rankings[k]
            if item.explain and k in hits:
                explanation = hits[k]
                explanation.update(cached=True, elapsed_ms=round(lookup_ms, 2))
                self.record_explanation(lookup_ms, method=item.method, layer=explanation["layer"], cached=True)
                answers[item.idx] = answer(self.context, item.idx, envelope(ranked, explanation))
                return
            if item.explain and k not in failures and item.contrast == results.get(k, {}).get("target", item.target):
                failures[k] = RequestError("'contrast' is the predicted class; name another class", "bad_contrast")
            if item.explain and k in failures:
                answers[item.idx] = answer_error(self.context, item.idx, failures[k])
            elif item.explain:
                began = time.perf_counter()
                explanation = self._explanation(item, results[k])
                if cache_keys.get(k) is not None:
                    self.cache.put(cache_keys[k], explanation)
                explanation["cached"] = False
                explanation["elapsed_ms"] = round(results[k]["elapsed_ms"] + (time.perf_counter() - began) * 1000, 2)
                self.record_explanation(explanation["elapsed_ms"], method=item.method, layer=explanation["layer"])
                answers[item.idx] = answer(self.context, item.idx, envelope(ranked, explanation))
            else:
                answers[item.idx] = self.answer_prediction(item, ranked)

        late = set(integrated) | set(late_cam)
        for k in range(len(items)):
            if k not in late:
                finish(k)
        if late:
            self.answer_early()  # the predictions (and CAM maps) need not wait for the rest
        if late_cam:  # explicit classes: the maps explain what this batch's forward predicted
            targets = {k: predicted[k] if items[k].target is None else items[k].target for k in late_cam}
            self._cam(batch, late_cam, items, targets, results, failures, fused=False)
        for method in IG_METHODS:  # after the shared prediction forward, one captum call per step count
            for n_steps in sorted({steps[k] for k in integrated if items[k].method == method}):
                rows = [k for k in integrated if items[k].method == method and steps[k] == n_steps]
                self._integrate(method, n_steps, batch, rows, items, predicted, results, failures)
        for k in sorted(late):
            finish(k)

    def _cam(self, batch, rows, items, targets, results, failures, fused: bool = True):
        """CAM maps of ``rows`` (``targets[k]``: a class index, or None for the predicted
        class) in one forward and partial backward pass, into ``results``. ``fused``: the
        pass runs the whole batch and returns its logits (the predictions; None when every
        row failed or ran out of time); otherwise it runs ``rows`` alone and returns None."""
        began = time.perf_counter()
        try:
            self.inject_fault()

            def work(keys):
                inputs, explained = (batch, keys) if fused else (batch[keys], list(range(len(keys))))
                return self.gradcam.attribute(inputs, [targets[k] for k in keys], explained,
                                              [items[k].contrast for k in keys], [items[k].method for k in keys])

            done, out, late = self.within_deadlines(rows, items, work)
        except Exception as exc:  # the explanations fail alone; predictions go on
            self._failed(exc, rows, items, failures)
            return None
        failures.update(late)
        elapsed = (time.perf_counter() - began) * 1000
        for j, k in enumerate(done):
            results[k] = {"heatmap": out.heatmaps[j], "target": out.targets[j], "elapsed_ms": elapsed}
        return out.logits if fused and out is not None else None

    def _output_params(self, item: Prepared) -> dict:
        """The request fields that shape the explanation part of the answer."""
        settings = self.explain_settings
        outputs = item.request.outputs if item.request.outputs is not None else settings.outputs
        params = {"outputs": sorted(outputs), "heatmap_size": item.request.heatmap_size or settings.heatmap_size,
                  "contrast": item.contrast}
        if item.method in IG_METHODS:
            params["n_steps"] = item.request.n_steps or settings.n_steps
        return params

    def _integrate(self, method, n_steps, batch, rows, items, predicted, results, failures) -> None:
        """Layer IG or input IG of ``rows`` in one captum call (steps in internal batches)."""
        targets = [predicted[k] if items[k].target is None else items[k].target for k in rows]
        for j, k in enumerate(rows):
            results[k] = {"target": targets[j], "elapsed_ms": 0.0}
        kept = [j for j, k in enumerate(rows) if items[k].contrast != targets[j]]  # the others get bad_contrast
        if not kept:
            return
        settings = self.explain_settings
        began = time.perf_counter()
        try:
            self.inject_fault()
            position = {rows[j]: j for j in kept}
            done, out, late = self.within_deadlines([rows[j] for j in kept], items, lambda ks: self.integrated[method].attribute(
                batch[ks], [targets[position[k]] for k in ks], [items[k].contrast for k in ks],
                n_steps=n_steps, internal_batch_size=settings.internal_batch_size, num_classes=len(self.labels),
                method=settings.integration_method))
        except Exception as exc:
            self._failed(exc, [rows[j] for j in kept], items, failures)
            return
        failures.update(late)
        elapsed = (time.perf_counter() - began) * 1000
        for i, j in enumerate(position[k] for k in done):
            results[rows[j]].update(attribution=out.maps[i], delta=float(out.delta[i]), gap=float(out.gap[i]),
                                    elapsed_ms=elapsed)

    def _failed(self, exc: Exception, rows: list[int], items: list, failures: dict) -> None:
        logger.error("explanation failed: %s", type(exc).__name__)
        error = explanation_failed(exc)
        for k in rows:
            self.count("ExplanationsFailed", method=items[k].method)
            failures[k] = error

    def _explanation(self, item: Prepared, result: dict) -> dict:
        settings = self.explain_settings
        outputs = item.request.outputs if item.request.outputs is not None else tuple(settings.outputs)
        size = item.request.heatmap_size or settings.heatmap_size
        target = result["target"]
        explanation = {"method": item.method, "target": {"index": target, "label": self.labels[target]}}
        explanation["contrast"] = (None if item.contrast is None
                                   else {"index": item.contrast, "label": self.labels[item.contrast]})
        explanation["layer"] = "input" if item.method == "integrated_gradients" else self.layer_name
        input_size = (item.inputs.shape[1], item.inputs.shape[2])
        extra = {}
        if item.method in IMAGE_CAM_METHODS:
            heatmap = result["heatmap"].detach().cpu()
            values = resize_map(heatmap, *input_size) if size == "input" else heatmap
        else:
            # Signed attributions: values in [-1, 1], times `scale` gives logit units per cell.
            attribution = result["attribution"].detach().cpu()
            if item.method == "integrated_gradients" and size == "feature":
                attribution = sum_pool(attribution[None], *self.feature_size)[0]
            scale = float(attribution.abs().max())
            values = attribution / scale if scale > 0 else torch.zeros_like(attribution)
            if size == "input" and tuple(values.shape) != input_size:
                values = F.interpolate(values[None, None], size=input_size, mode="bilinear", align_corners=False)[0, 0]
            heatmap = values.clamp(min=0)  # the overlay shows the evidence for the target
            extra = {"scale": float(f"{scale:.6g}")}
            absolute = abs(result["delta"])
            explanation.update(
                n_steps=item.request.n_steps or settings.n_steps, integration=settings.integration_method, baseline="zeros",
                convergence_delta={"absolute": absolute, "relative": absolute / max(abs(result["gap"]), 1e-12)})
        if "heatmap" in outputs:
            rounded = [[round(v, settings.heatmap_decimals) for v in row] for row in values.tolist()]
            explanation["heatmap"] = {"shape": list(values.shape), "values": rounded, **extra}
        if "overlay_png" in outputs:
            box = self.preprocessing.crop_box(*item.original.size)
            png = render_overlay(item.original, heatmap, box, settings.overlay_alpha)
            explanation["overlay_png"] = base64.b64encode(png).decode("ascii")
        return explanation
