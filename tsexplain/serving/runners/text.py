"""Text classifiers: tokenize and predict, explain with Layer IG, gradient x input or
occlusion (the request's method), render tokens, words and an optional HTML snippet."""
from __future__ import annotations

import dataclasses
import html
import logging

import torch
import torch.nn.functional as F

from ...attr.text import make_text_explainer
from ...attr.text.lig import DEFAULT_INTERNAL_BATCH_SIZE, AdaptiveSteps, TimeLimits
from ...attr.text.tokens import WordAttribution
from ..deadline import Deadline
from ..errors import ConfigError, DeadlineExceeded
from ..schema import TEXT
from ..settings import ModelSettings
from .base import Item, Runner

logger = logging.getLogger(__name__)


def explainer_options(method: str, settings: ModelSettings) -> dict:
    """The settings that configure ``method``'s explainer, by its option names."""
    s = settings.explain
    common = {"layer": s.layer, "max_length": settings.handler.max_length}
    if method == "layer_ig":
        return common | {"baseline": s.baseline, "n_steps": s.n_steps, "integration_method": s.integration_method,
                         "internal_batch_size": s.internal_batch_size, "precision": s.precision,
                         "memory_budget_mb": s.memory_budget_mb,
                         "adaptive": AdaptiveSteps(s.adaptive_start, s.adaptive_top, s.max_relative_delta)}
    if method == "occlusion":  # internal_batch_size "auto" is measured for the integration only
        batch = DEFAULT_INTERNAL_BATCH_SIZE if s.internal_batch_size == "auto" else s.internal_batch_size
        return common | {"baseline": s.baseline, "internal_batch_size": batch, "max_words": s.occlusion_max_words}
    return common


class TextRunner(Runner):
    """The text steps of the flow for a Hugging Face sequence classifier.

    Args:
        model, tokenizer: what predictions run on (the worker's).
        explained_model, explained_tokenizer: what explanations run on: the same, or
            with concurrent explanations a copy sharing the model's weights and a
            tokenizer of its own (a fast tokenizer's padding state is not thread-safe).
        settings: the model's settings.
        device: where the model is.

    Raises:
        ConfigError: an explainer cannot be built on this model (layer, tokenizer, baseline).
    """

    modality = TEXT
    explanation_fields = ("n_steps", "top_k", "html")
    log_fields = ("n_steps",)

    def __init__(self, model, tokenizer, explained_model, explained_tokenizer, settings: ModelSettings,
                 device: torch.device):
        self.model, self.tokenizer = model, tokenizer
        self.settings = settings
        self.device = device
        id2label = model.config.id2label
        self.labels = [str(id2label.get(i, i)) for i in range(model.config.num_labels)]
        explain = settings.explain
        try:
            self.explainers = {m: make_text_explainer(m, explained_model, explained_tokenizer,
                                                      **explainer_options(m, settings)) for m in explain.methods}
        except ValueError as exc:
            raise ConfigError(f"explain: {exc}") from None
        # the baseline each method integrates from (the family's for "auto"), for the audit records
        self.baselines = {m: e.text.baseline for m, e in self.explainers.items()
                          if "baseline" in explainer_options(m, settings)}
        default = self.explainers[explain.method]
        self.max_length = default.max_length
        logger.info("text explanations %s (default %s) on %s, %d labels, max_length %d", ",".join(explain.methods),
                    explain.method, default.layer_name, len(self.labels), self.max_length)

    def prepare(self, item: Item) -> None:
        item.inputs = item.request.data  # the text; tokenized with the batch

    def cache_input(self, item: Item) -> bytes:
        return item.inputs.encode("utf-8")

    def prediction_top_k(self, item: Item) -> int:
        return self.settings.handler.top_k or len(self.labels)

    def record_parameters(self, item: Item, explanation: dict) -> dict:
        s, options = self.settings.explain, item.options
        # the effective values: the method's baseline, the adaptive cap for a left-out adaptive_max
        params = {"layer": explanation.get("layer"), "n_steps": explanation.get("n_steps"),
                  "integration": explanation.get("integration"), "precision": explanation.get("precision"),
                  "baseline": self.baselines.get(item.method), "max_length": self.max_length, "top_k": options["top_k"],
                  "html": options["html"], "internal_batch_size": s.internal_batch_size}
        if item.method == "layer_ig" and options["n_steps"] == "auto":
            params["adaptive"] = {"start": s.adaptive_start, "max": s.adaptive_top,
                                  "max_relative_delta": s.max_relative_delta}
        return params

    def input_content_type(self, item: Item) -> str:
        return "text/plain; charset=utf-8"

    def forward(self, items: list[Item], fused: list[Item]) -> torch.Tensor:
        # NumPy arrays, then tensors sharing their memory: the same int64 tensors as
        # return_tensors="pt", which builds them from nested lists (slower)
        encoded = self.tokenizer([item.inputs for item in items], truncation=True, max_length=self.max_length,
                                 padding=True, return_tensors="np")
        with torch.inference_mode():
            logits = self.model(**{k: torch.from_numpy(v).to(self.device) for k, v in encoded.items()}).logits
        return F.softmax(logits.float(), dim=1).cpu()

    def group_key(self, item: Item):
        return item.method, item.options["n_steps"], item.options["top_k"]

    def explain(self, items: list[Item]) -> list:
        first = items[0]
        # adaptive Layer IG stops a text's doubling where its deadline leaves no time for the next
        # round (docs/design.md, "Adaptive steps near a deadline")
        limits = {"limits": TimeLimits([seconds_left(item.deadline) for item in items], (DeadlineExceeded,))} \
            if first.method == "layer_ig" else {}
        return self.explainers[first.method].explain(
            [item.inputs for item in items], [item.explained_class for item in items], n_steps=first.options["n_steps"],
            top_k=first.options["top_k"], contrast=[item.contrast for item in items], **limits)

    def render(self, item: Item) -> dict:
        result = item.result
        body = dataclasses.asdict(result)
        body["integration"] = body.pop("method")  # the core's integration rule (None: no integration)
        body["method"] = item.method
        body["target"] = {"index": result.target, "label": self.labels[result.target]}
        if result.contrast is not None:
            body["contrast"] = {"index": result.contrast, "label": self.labels[result.contrast]}
        if item.options["html"]:
            body["html"] = render_html(result.words, item.inputs)
        return body


def seconds_left(deadline: Deadline | None):
    """A callable giving the seconds left before ``deadline``, or None for none."""
    return None if deadline is None else (lambda: deadline.remaining_ms() / 1000)


def render_html(words: list[WordAttribution], text: str) -> str:
    """HTML snippet of ``text`` with every word in a ``<span>`` coloured by its
    attribution: green for positive, red for negative, opacity ``|a| / max|a|``;
    the ``title`` holds the value. Text between words is kept; everything is
    HTML-escaped. No external assets."""
    scale = max((abs(w.attribution) for w in words), default=0.0) or 1.0
    parts, pos = [], 0
    for w in sorted(words, key=lambda w: w.start):
        parts.append(html.escape(text[pos : w.start]))
        alpha = abs(w.attribution) / scale
        rgb = "0, 160, 0" if w.attribution >= 0 else "220, 0, 0"
        parts.append(
            f'<span style="background-color: rgba({rgb}, {alpha:.3f})" '
            f'title="{w.attribution:+.6g}">{html.escape(text[w.start : w.end])}</span>'
        )
        pos = max(pos, w.end)
    parts.append(html.escape(text[pos:]))
    return '<div style="white-space: pre-wrap">' + "".join(parts) + "</div>"
