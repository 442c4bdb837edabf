"""Word occlusion on one layer of a text classifier (captum's LayerFeatureAblation)."""
from __future__ import annotations

import torch
from captum.attr import LayerFeatureAblation

from ..errors import TooManyWords
from .lig import DEFAULT_INTERNAL_BATCH_SIZE
from .model import TextModel, class_indices
from .tokens import TextExplanation, word_pieces

DEFAULT_MAX_WORDS = 256


class OcclusionTextExplainer:
    """Word occlusion: a word's attribution is ``F(x) - F(x with that word occluded)``,
    the drop of the target **logit** (minus the contrast logit). Logits rather than
    probabilities, so that the attribution is linear in the logits: the contrastive
    attribution is exactly the target's minus the contrast's, and one word's effect
    does not shrink because the softmax is saturated.

    A word is the group of pieces :func:`~tsexplain.attr.text.tokens.word_pieces`
    gives (the ``words`` of the output). Occluding it replaces the layer output at
    all its pieces by the layer output of the baseline token (PAD / UNK / MASK),
    while the model's other inputs stay those of ``x``: with the input embeddings
    as the layer this is the same as replacing the tokens' ids, except that the
    position ids of RoBERTa-like models (derived from the PAD positions of
    ``input_ids``) do not shift; the same replacement as Layer IG's baseline. Runs
    through captum's :class:`~captum.attr.LayerFeatureAblation`.

    Cost: ``1 + max(words)`` forward passes of the batch (no backward), grouped into
    passes of at most ``internal_batch_size`` rows (at least one full batch per
    pass). ``tokens`` list each piece with an equal share of its word's drop, so
    that a word's value is still the sum of its pieces'.

    Args:
        model, tokenizer, layer, baseline, max_length: see
            :class:`~tsexplain.attr.text.model.TextModel`.
        internal_batch_size: rows per forward pass (occluded variants of the batch).
        max_words: the most words a text may have; a longer one raises
            :class:`~tsexplain.attr.errors.TooManyWords`: the cost grows with the
            word count. None: no limit beyond ``max_length``.

    Raises:
        ValueError: as :class:`~tsexplain.attr.text.model.TextModel`, or invalid numbers.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        layer: str | None = None,
        baseline: str = "auto",
        internal_batch_size: int = DEFAULT_INTERNAL_BATCH_SIZE,
        max_length: int | None = None,
        max_words: int | None = DEFAULT_MAX_WORDS,
    ):
        if not isinstance(internal_batch_size, int) or isinstance(internal_batch_size, bool) or internal_batch_size < 1:
            raise ValueError(f"internal_batch_size must be a positive int, got {internal_batch_size!r}")
        if max_words is not None and (not isinstance(max_words, int) or isinstance(max_words, bool) or max_words < 1):
            raise ValueError(f"max_words must be a positive int or None, got {max_words!r}")
        self.text = TextModel(model, tokenizer, layer, baseline, max_length)
        self.internal_batch_size = internal_batch_size
        self.max_words = max_words

    @property
    def layer_name(self) -> str:
        return self.text.layer_name

    @property
    def max_length(self) -> int:
        return self.text.max_length

    def explain(self, texts: list[str], targets: list[int], n_steps=None, top_k: int = 5,
                contrast: list[int | None] | None = None) -> list[TextExplanation]:
        """Explain ``targets[i]`` (minus ``contrast[i]``, where given) for ``texts[i]``.

        Arguments and errors as :meth:`~tsexplain.attr.text.lig.LayerIGTextExplainer.explain`,
        and :class:`~tsexplain.attr.errors.TooManyWords`; ``n_steps`` must be None.
        """
        if n_steps is not None:
            raise ValueError("occlusion takes no n_steps (it does not integrate)")
        text = self.text
        texts, targets, contrast = text.check(texts, targets, contrast, top_k)
        if not texts:
            return []
        encoded = text.encode(texts)
        keeps = [encoded.keep(i) for i in range(len(texts))]  # positions of each text's content tokens
        words = [word_pieces(t, encoded.offsets(i, keep), encoded.word_ids(i, keep))
                 for i, (t, keep) in enumerate(zip(texts, keeps))]
        for i, text_words in enumerate(words):
            if self.max_words is not None and len(text_words) > self.max_words:
                raise TooManyWords(f"text {i} has {len(text_words)} words; occlusion explains at most "
                                   f"{self.max_words} (use a shorter text or another method)")
        ids, attention_mask, token_type_ids, content = text.tensors(encoded, encoded.rows)
        with text.eval_mode():
            per_token, per_word = self._occlude(ids, text.extra(attention_mask, token_type_ids),
                                                class_indices(targets, contrast, ids.device), content, keeps, words)
        return text.explanations(texts, encoded, per_token, targets, contrast, top_k, per_word=per_word, n_steps=None,
                                 method=None, convergence_delta=None)

    def _occlude(self, ids, extra, classes, content, keeps, words):
        """Per-token shares ``(batch, seq)`` and per-word drops of the batch."""
        text = self.text
        batch = ids.shape[0]
        content = content.to(ids.device)
        baseline_ids = ids.masked_fill(content, text.baseline_id)
        # feature w of row i = its word w; special tokens and padding share feature 0 and
        # are "ablated" with their own value (a no-op), so they cost no extra pass
        layer_mask = torch.zeros(ids.shape, dtype=torch.long)
        for i, (keep, text_words) in enumerate(zip(keeps, words)):
            for w, (_, _, pieces) in enumerate(text_words):
                layer_mask[i, [keep[k] for k in pieces]] = w
        with torch.inference_mode():
            both = text.layer_output(torch.cat([ids, baseline_ids]), tuple(torch.cat([a, a]) for a in extra))
            own, occluded = both[:batch], both[batch:]
            if own.shape[:2] != ids.shape:
                raise ValueError(f"layer {text.layer_name!r} must output a (batch, seq, ...) tensor")
            shape = (*ids.shape, *[1] * (own.dim() - 2))
            layer_baselines = torch.where(content.view(shape), occluded, own)
            attributions = LayerFeatureAblation(text.score, text.layer).attribute(
                ids,
                layer_baselines=layer_baselines,
                additional_forward_args=(classes, *extra),
                layer_mask=layer_mask.to(ids.device).view(shape),
                perturbations_per_eval=max(1, self.internal_batch_size // batch),
            )
        per_position = attributions.flatten(2)[:, :, 0].double().cpu()  # the same value over a position's features
        per_word = [[float(per_position[i, keep[pieces[0]]]) for _, _, pieces in text_words]
                    for i, (keep, text_words) in enumerate(zip(keeps, words))]  # fmt: skip
        per_token = torch.zeros(ids.shape, dtype=torch.float64)
        for i, (keep, text_words) in enumerate(zip(keeps, words)):
            for value, (_, _, pieces) in zip(per_word[i], text_words):
                per_token[i, [keep[k] for k in pieces]] = value / len(pieces)
        return per_token, per_word
