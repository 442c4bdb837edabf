"""TextExplainer: Hugging Face sequence classifiers with Layer Integrated Gradients.

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

from explain_common import ExplainerFlow, Prepared, answer, answer_error, envelope, explanation_failed, ranked_predictions
from tsexplain.errors import ConfigError, RequestError
from tsexplain.parsing import parse_text_request, resolve_target
from tsexplain.settings import TextExplainSettings, TextModelSettings, load_section
from tsexplain.text_attribution import LayerIGTextExplainer, render_html

logger = logging.getLogger(__name__)


class TextExplainer(ExplainerFlow, TextClassifier):
    """Text classifier handler whose ``/explanations`` route serves Layer IG."""

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
        self.explainer = LayerIGTextExplainer(
            self.model, self.tokenizer, layer=settings.layer, baseline=settings.baseline, n_steps=settings.n_steps,
            integration_method=settings.integration_method, internal_batch_size=settings.internal_batch_size,
            max_length=self.model_settings.max_length,
        )
        self.max_length = self.explainer.max_length
        self.initialized = True
        logger.info("Layer IG on %s, %d labels, max_length %d", self.explainer.layer_name, len(self.labels), self.max_length)

    def _parse(self, row):
        return parse_text_request(row, self.model_settings.max_text_chars, self.explain_settings.max_n_steps)

    def _prepare(self, idx, request) -> Prepared:
        method = self.explain_settings.method
        if request.method not in (None, method):
            raise RequestError(f"unknown method {request.method[:32]!r}; available: ['{method}']", "unknown_method")
        return Prepared(idx, request, False, resolve_target(request.target, self.labels), request.text)

    def _predict(self, texts: list[str]) -> torch.Tensor:
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        with torch.inference_mode():
            logits = self.model(**{k: v.to(self.device) for k, v in encoded.items()}).logits
        return F.softmax(logits.float(), dim=1).cpu()

    def _answer_batch(self, items: list[Prepared], answers: list) -> None:
        probabilities = self._predict([item.inputs for item in items])
        settings = self.explain_settings
        groups: dict[tuple[int, int], list[int]] = {}  # same n_steps and top_k: one batched call
        for k, item in enumerate(items):
            if item.explain:
                if item.target is None:
                    item.target = int(probabilities[k].argmax())
                key = (item.request.n_steps or settings.n_steps, item.request.top_k or settings.top_k_words)
                groups.setdefault(key, []).append(k)
        explanations = {}
        began = time.perf_counter()
        for (n_steps, top_k), members in groups.items():  # each group fails or times out alone
            try:
                self.inject_fault()
                _, results, late = self.within_deadlines(
                    members, items, lambda keys: self._explain_group([items[k] for k in keys], keys, n_steps, top_k))
                explanations.update(results or {})
                explanations.update(late)
            except Exception as exc:  # the explanation fails alone; predictions go on
                logger.error("Layer IG failed: %s", type(exc).__name__)
                self.count("ExplanationsFailed", len(members))
                explanations.update(dict.fromkeys(members, explanation_failed(exc)))
        explain_ms = (time.perf_counter() - began) * 1000

        top_k = self.model_settings.top_k or len(self.labels)
        for k, item in enumerate(items):
            ranked = ranked_predictions(probabilities[k], self.labels, top_k)
            result = explanations.get(k)
            if item.explain and isinstance(result, RequestError):
                answers[item.idx] = answer_error(self.context, item.idx, result)
            elif item.explain:
                explanation = self._explanation(item, result)
                explanation["elapsed_ms"] = round(explain_ms, 2)
                self.record_explanation(explain_ms, n_steps=result.n_steps)
                answers[item.idx] = answer(self.context, item.idx, envelope(ranked, explanation))
            else:
                answers[item.idx] = self.answer_prediction(item, ranked)

    def _explain_group(self, group: list[Prepared], keys: list[int], n_steps: int, top_k: int) -> dict:
        """Explanations (or per-request errors) for requests sharing n_steps and top_k."""
        try:
            results = self.explainer.explain([i.inputs for i in group], [i.target for i in group], n_steps=n_steps, top_k=top_k)
            return dict(zip(keys, results))
        except RequestError:  # one bad text: explain one by one so only it fails
            out = {}
            for key, item in zip(keys, group):
                try:
                    out[key] = self.explainer.explain([item.inputs], [item.target], n_steps=n_steps, top_k=top_k)[0]
                except RequestError as error:
                    out[key] = error
            return out

    def _explanation(self, item: Prepared, result) -> dict:
        body = dataclasses.asdict(result)
        body["integration"] = body.pop("method")  # the core's integration rule
        body["method"] = self.explain_settings.method
        body["target"] = {"index": result.target, "label": self.labels[result.target]}
        want_html = item.request.html if item.request.html is not None else self.explain_settings.html
        if want_html:
            body["html"] = render_html(result.words, item.inputs)
        return body
