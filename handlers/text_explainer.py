"""TextExplainer: Hugging Face sequence classifiers with Layer Integrated Gradients,
gradient x input or word occlusion (chosen per request among ``explain.methods``).

The MAR carries a ``save_pretrained`` folder (model and fast tokenizer); nothing
is fetched from a hub. ``/predictions`` answers ``{label: probability}``;
``/explanations`` answers ``{"predictions": [...], "explanation": {...}}`` with
per-token and per-word attributions on the input embeddings of the same model.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from ts.torch_handler.text_classifier import TextClassifier

from explain_common import ExplainerFlow, Prepared, answer, answer_error, envelope, explanation_failed, ranked_rows
from tsexplain.errors import ConfigError, RequestError
from tsexplain.parsing import parse_text_request, resolve_target
from tsexplain.settings import TextExplainSettings, TextModelSettings, load_section
from tsexplain.text_attribution import DEFAULT_INTERNAL_BATCH_SIZE, AdaptiveSteps, render_html
from tsexplain.text_methods import TEXT_METHODS, make_text_explainer

logger = logging.getLogger(__name__)

# TorchServe's loader wants exactly one class defined in a handler module: the
# contrast rides on explain_common.Prepared.


class TextExplainer(ExplainerFlow, TextClassifier):
    """Text classifier handler whose ``/explanations`` route serves Layer IG,
    gradient x input or word occlusion."""

    def initialize(self, context):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        config = getattr(context, "model_yaml_config", None) or {}
        name = context.model_name
        self.model_settings = load_section(TextModelSettings, config.get("handler"), name, os.environ)
        self.explain_settings = load_section(TextExplainSettings, config.get("explain"), name, os.environ)
        self._init_access()
        properties = context.system_properties
        gpu_id = properties.get("gpu_id")
        self.device = torch.device(f"cuda:{gpu_id}" if torch.cuda.is_available() and gpu_id is not None else "cpu")
        self.manifest = context.manifest
        model_path = Path(properties.get("model_dir")) / self.model_settings.model_path
        if not (model_path / "config.json").exists():
            raise ConfigError(f"no Hugging Face model in the MAR at {self.model_settings.model_path!r}")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_path, local_files_only=True)
        self.model.to(self.device).eval()
        id2label = self.model.config.id2label
        self.labels = [str(id2label.get(i, i)) for i in range(self.model.config.num_labels)]
        settings = self.explain_settings
        explained_model, explained_tokenizer = self._init_concurrency(context, self.model, self.tokenizer)
        self.explainers = {}
        for method in settings.methods:
            options = dict(
                layer=settings.layer, baseline=settings.baseline, n_steps=settings.n_steps,
                integration_method=settings.integration_method, internal_batch_size=settings.internal_batch_size,
                max_length=self.model_settings.max_length, max_words=settings.occlusion_max_words,
            )
            if method == "layer_ig":  # the integration's speed settings
                options.update(precision=settings.precision, memory_budget_mb=settings.memory_budget_mb,
                               adaptive=AdaptiveSteps(settings.adaptive_start, settings.adaptive_max,
                                                      settings.max_relative_delta))
            elif settings.internal_batch_size == "auto":  # measured for the integration only
                options["internal_batch_size"] = DEFAULT_INTERNAL_BATCH_SIZE
            self.explainers[method] = make_text_explainer(method, explained_model, explained_tokenizer, **options)
        self.explainer = self.explainers[settings.method]  # the default method's
        self.max_length = self.explainer.max_length
        self._init_cache(context)
        self.initialized = True
        logger.info("text explanations %s (default %s) on %s, %d labels, max_length %d", ",".join(settings.methods),
                    settings.method, self.explainer.layer_name, len(self.labels), self.max_length)

    def _parse(self, row):
        return parse_text_request(row, self.model_settings.max_text_chars, self.explain_settings.max_n_steps)

    def _prepare(self, idx, request) -> Prepared:
        settings = self.explain_settings
        method = request.method or settings.method
        if method not in TEXT_METHODS:
            raise RequestError(f"unknown method {method[:32]!r}; known: {list(TEXT_METHODS)}", "unknown_method")
        if method not in settings.methods:
            raise RequestError(f"method {method!r} is not allowed for this model; allowed: {list(settings.methods)}",
                               "method_not_allowed", 403)
        target = resolve_target(request.target, self.labels)
        contrast = resolve_target(request.contrast, self.labels, "contrast")
        if contrast is not None and contrast == target:
            raise RequestError("'contrast' must differ from 'target'", "bad_contrast")
        return Prepared(idx, request, False, target, request.text, method=method, contrast=contrast)

    def _predict(self, texts: list[str]) -> torch.Tensor:
        # NumPy arrays, then tensors sharing their memory: the same int64 tensors as
        # return_tensors="pt", which builds them from nested lists (slower)
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="np")
        with torch.inference_mode():
            logits = self.model(**{k: torch.from_numpy(v).to(self.device) for k, v in encoded.items()}).logits
        return F.softmax(logits.float(), dim=1).cpu()

    def _answer_batch(self, items: list[Prepared], answers: list) -> None:
        probabilities = self._predict([item.inputs for item in items])
        settings = self.explain_settings
        groups: dict[tuple, list[int]] = {}  # same method and parameters: one batched call
        errors: dict[int, RequestError] = {}
        began = time.perf_counter()
        hits, cache_keys = {}, {}
        for k, item in enumerate(items):
            if item.explain:
                named, predicted = item.target, int(probabilities[k].argmax())
                if item.target is None:
                    item.target = predicted
                if item.contrast == item.target:  # the predicted class was asked as the contrast
                    errors[k] = RequestError("'contrast' is the explained (predicted) class", "bad_contrast")
                    continue
                n_steps = (item.request.n_steps or settings.n_steps) if item.method == "layer_ig" else None
                key = (item.method, n_steps, item.request.top_k or settings.top_k_words)
                cache_keys[k] = self.explanation_key(  # no target: keyed as "the predicted class", as for images
                    item.inputs.encode("utf-8"), item.method, named,
                    {"n_steps": n_steps, "top_k": key[2], "html": self._wants_html(item), "contrast": item.contrast},
                )
                found = self.cached_explanation(cache_keys[k])
                if found is not None and not self.usable_hit(found, named, predicted):
                    found = None  # stored when another class was predicted: explained again
                if cache_keys[k] is not None:
                    self.count_cache(found is not None, item.method)
                if found is not None:
                    hits[k] = found
                else:
                    groups.setdefault(key, []).append(k)
        lookup_ms = (time.perf_counter() - began) * 1000
        explanations = dict(errors)
        top_k = self.model_settings.top_k or len(self.labels)
        rankings = ranked_rows(probabilities, self.labels, [top_k] * len(items))

        def finish(k: int) -> None:
            item = items[k]
            ranked = rankings[k]
            result = explanations.get(k)
            if item.explain and k in hits:
                explanation = hits[k]
                explanation.update(cached=True, elapsed_ms=round(lookup_ms, 2))
                self.record_explanation(lookup_ms, method=item.method, n_steps=explanation["n_steps"], cached=True)
                answers[item.idx] = answer(self.context, item.idx, envelope(ranked, explanation))
            elif item.explain and isinstance(result, RequestError):
                answers[item.idx] = answer_error(self.context, item.idx, result)
            elif item.explain:
                explanation = self._explanation(item, result)
                if cache_keys.get(k) is not None:
                    self.cache.put(cache_keys[k], explanation)
                explanation["cached"] = False
                explanation["elapsed_ms"] = round(explain_ms, 2)
                self.record_explanation(explain_ms, method=item.method, n_steps=result.n_steps)
                answers[item.idx] = answer(self.context, item.idx, envelope(ranked, explanation))
            else:
                answers[item.idx] = self.answer_prediction(item, ranked)

        waiting = {k for members in groups.values() for k in members}
        for k in range(len(items)):
            if k not in waiting:
                finish(k)
        if waiting:
            self.answer_early()  # the predictions need not wait for the integration
        began = time.perf_counter()
        for (method, n_steps, top_k_words), members in groups.items():  # each group fails or times out alone
            try:
                self.inject_fault()
                _, results, late = self.within_deadlines(members, items, lambda keys: self._explain_group(
                    [items[k] for k in keys], keys, method, n_steps, top_k_words))
                explanations.update(results or {})
                explanations.update(late)
            except Exception as exc:  # the explanation fails alone; predictions go on
                logger.error("text explanation failed: %s", type(exc).__name__)
                self.count("ExplanationsFailed", len(members), method=method)
                explanations.update(dict.fromkeys(members, explanation_failed(exc)))
        explain_ms = (time.perf_counter() - began) * 1000
        for k in sorted(waiting):
            finish(k)

    def _explain_group(self, group: list[Prepared], keys: list[int], method: str, n_steps, top_k: int) -> dict:
        """Explanations (or per-request errors) for requests sharing method, n_steps and top_k."""
        explainer = self.explainers[method]

        def explain(members: list[Prepared]):
            return explainer.explain([i.inputs for i in members], [i.target for i in members], n_steps=n_steps,
                                     top_k=top_k, contrast=[i.contrast for i in members])

        try:
            return dict(zip(keys, explain(group)))
        except RequestError:  # one bad text: explain one by one so only it fails
            out = {}
            for key, item in zip(keys, group):
                try:
                    out[key] = explain([item])[0]
                except RequestError as error:
                    out[key] = error
            return out

    def _explanation(self, item: Prepared, result) -> dict:
        body = dataclasses.asdict(result)
        body["integration"] = body.pop("method")  # the core's integration rule (None: no integration)
        body["method"] = item.method
        body["target"] = {"index": result.target, "label": self.labels[result.target]}
        if result.contrast is not None:
            body["contrast"] = {"index": result.contrast, "label": self.labels[result.contrast]}
        if self._wants_html(item):
            body["html"] = render_html(result.words, item.inputs)
        return body

    def _wants_html(self, item: Prepared) -> bool:
        return item.request.html if item.request.html is not None else self.explain_settings.html
