"""Gradient x input on one layer of a text classifier (captum's LayerGradientXActivation)."""
from __future__ import annotations

import torch
from captum.attr import LayerGradientXActivation

from .model import TextModel, class_indices, first_available_baseline
from .tokens import TextExplanation


class GradXInputTextExplainer:
    """Gradient × input on one layer of a Hugging Face sequence classifier (by
    default its input embeddings): per token, ``sum_h dF/dz_h * z_h`` where ``z`` is
    the layer's output and ``F`` the target logit (minus the contrast logit). One
    forward and one backward pass for the whole batch, through captum's
    :class:`~captum.attr.LayerGradientXActivation`.

    It is the first-order Taylor term of ``F`` around ``z = 0``, not around a token
    baseline, and has no completeness property: cheap, local and noisier than
    Layer IG. Special tokens and padding are not listed. The answer has the shape of
    Layer IG's, with ``n_steps``, ``method`` and ``convergence_delta`` None.

    Args:
        model, tokenizer, layer, max_length: see :class:`~tsexplain.attr.text.model.TextModel`.

    Raises:
        ValueError: as :class:`~tsexplain.attr.text.model.TextModel`.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, layer: str | None = None, max_length: int | None = None):
        # no baseline is used; one is only needed to pad a batch when the tokenizer has no PAD token
        self.text = TextModel(model, tokenizer, layer, first_available_baseline(tokenizer), max_length)

    @property
    def layer_name(self) -> str:
        return self.text.layer_name

    @property
    def max_length(self) -> int:
        return self.text.max_length

    def explain(self, texts: list[str], targets: list[int], n_steps=None, top_k: int = 5,
                contrast: list[int | None] | None = None) -> list[TextExplanation]:
        """Explain ``targets[i]`` (minus ``contrast[i]``, where given) for ``texts[i]``.

        Arguments and errors as :meth:`~tsexplain.attr.text.lig.LayerIGTextExplainer.explain`;
        ``n_steps`` must be None (this method does not integrate).
        """
        if n_steps is not None:
            raise ValueError("gradient x input takes no n_steps (it does not integrate)")
        text = self.text
        texts, targets, contrast = text.check(texts, targets, contrast, top_k)
        if not texts:
            return []
        encoded = text.encode(texts)
        ids, attention_mask, token_type_ids, _ = text.tensors(encoded, encoded.rows)
        extra = text.extra(attention_mask, token_type_ids)
        with text.eval_mode(), torch.inference_mode(False), torch.enable_grad():
            attributions = LayerGradientXActivation(text.score, text.layer).attribute(
                ids, additional_forward_args=(class_indices(targets, contrast, ids.device), *extra))
        if not isinstance(attributions, torch.Tensor) or attributions.shape[:2] != ids.shape:
            raise ValueError(f"layer {text.layer_name!r} must output a (batch, seq, ...) tensor")
        per_token = attributions.detach().double().flatten(2).sum(-1).cpu()
        return text.explanations(texts, encoded, per_token, targets, contrast, top_k, n_steps=None, method=None,
                                 convergence_delta=None)
