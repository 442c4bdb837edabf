"""More attribution methods for Hugging Face text classifiers, and the choice among them.

Plain PyTorch + captum: no TorchServe import. Every explainer here has the call of
:meth:`tsexplain.text_attribution.LayerIGTextExplainer.explain`
(``explain(texts, targets, n_steps=None, top_k=5, contrast=None)``) and returns the
same :class:`~tsexplain.text_attribution.TextExplanation` (tokens, words, top words),
with ``n_steps``, ``method`` (integration rule) and ``convergence_delta`` set to None:
these methods do not integrate, and have no completeness check.

- ``grad_x_input`` (:class:`GradXInputTextExplainer`): gradient × activation on the
  embedding layer, one forward and one backward pass for the whole batch.
- ``occlusion`` (:class:`OcclusionTextExplainer`): the drop of the score when one
  word is replaced by the baseline token, one word at a time.

The attributed function is the same for all methods: the target logit, minus the
contrast logit when a ``contrast`` class is given (see
:func:`~tsexplain.text_attribution.class_score`). All three methods are linear in
that function, so a contrastive explanation equals the target's explanation minus
the contrast's.
"""

from __future__ import annotations

import inspect

import torch
from captum.attr import LayerFeatureAblation, LayerGradientXActivation

from tsexplain.errors import ConfigError, RequestError
from tsexplain.text_attribution import (
    BASELINES,
    DEFAULT_INTERNAL_BATCH_SIZE,
    LayerIGTextExplainer,
    TextExplanation,
    TokenAttribution,
    WordAttribution,
    _device,
    class_indices,
    word_pieces,
)

TEXT_METHODS = ("layer_ig", "grad_x_input", "occlusion")
DEFAULT_MAX_WORDS = 256


class _TextAttribution(LayerIGTextExplainer):
    """Shared request checks, tokenization and output of the non-integrating methods.

    Subclasses implement ``_attribute(ids, extra, classes, content, keeps, words)``
    (``keeps[i]``: sequence positions of text i's content tokens; ``words[i]``: its
    :func:`~tsexplain.text_attribution.word_pieces`, indices into ``keeps[i]``),
    returning per-token attributions ``(batch, seq)`` (special tokens and padding are
    ignored) and per-word values (or None: the sum over a word's pieces).
    """

    def explain(
        self,
        texts: list[str],
        targets: list[int],
        n_steps: int | None = None,
        top_k: int = 5,
        contrast: list[int | None] | None = None,
    ) -> list[TextExplanation]:
        """Explain ``targets[i]`` (minus ``contrast[i]``, where given) for ``texts[i]``.

        Args and errors as :meth:`LayerIGTextExplainer.explain`; ``n_steps`` is
        accepted for a uniform call and ignored (no integration).
        """
        texts, targets, _ = self._check_request(texts, targets, None, top_k)
        contrast = self._check_contrast(contrast, targets)
        if not texts:
            return []
        enc, rows, truncated = self._tokenize(texts)
        device = _device(self.model)
        ids, attention_mask, token_type_ids, content = self._tensors(enc, rows, device)
        extra = (attention_mask,) if token_type_ids is None else (attention_mask, token_type_ids)
        # per text: sequence positions of its content tokens, and its words over them
        keeps = [content[i].nonzero().flatten().tolist() for i in range(len(texts))]
        words = [
            word_pieces(text, [tuple(enc["offset_mapping"][row][j]) for j in keep], [enc.word_ids(row)[j] for j in keep])
            for text, row, keep in zip(texts, rows, keeps)
        ]
        self._check_words(words)

        modes = {module: module.training for module in self.model.modules()}
        self.model.eval()
        try:
            per_token, per_word = self._attribute(ids, extra, class_indices(targets, contrast, device), content, keeps, words)
        finally:
            for module, training in modes.items():
                module.training = training

        results = []
        for i, (text, row, keep) in enumerate(zip(texts, rows, keeps)):
            tokens_text = self.tokenizer.convert_ids_to_tokens(enc["input_ids"][row])
            tokens = [
                TokenAttribution(tokens_text[j], *enc["offset_mapping"][row][j], float(per_token[i, j])) for j in keep
            ]
            word_list = [
                WordAttribution(
                    text[start:end], start, end,
                    float(per_word[i][w]) if per_word is not None else float(sum(tokens[k].attribution for k in pieces)),
                )
                for w, (start, end, pieces) in enumerate(words[i])
            ]  # fmt: skip
            results.append(
                TextExplanation(
                    target=targets[i],
                    layer=self.layer_name,
                    n_steps=None,
                    method=None,
                    tokens=tokens,
                    words=word_list,
                    top_words=sorted(word_list, key=lambda w: -abs(w.attribution))[:top_k],
                    convergence_delta=None,
                    truncated=truncated[i],
                    contrast=contrast[i],
                )
            )
        return results

    def _check_words(self, words) -> None:
        pass

    def _attribute(self, ids, extra, classes, content, keeps, words):
        raise NotImplementedError


class GradXInputTextExplainer(_TextAttribution):
    """Gradient × input on one layer of a Hugging Face sequence classifier (by
    default its input embeddings): per token, ``sum_h dF/dz_h * z_h`` where ``z`` is
    the layer's output and ``F`` the target logit (minus the contrast logit). One
    forward and one backward pass for the whole batch, through captum's
    :class:`~captum.attr.LayerGradientXActivation`.

    It is the first-order Taylor term of ``F`` around ``z = 0``, not around a token
    baseline, and has no completeness property: cheap, local and noisier than
    Layer IG. Special tokens and padding are not listed.

    Args:
        model, tokenizer, layer, max_length: as for :class:`LayerIGTextExplainer`.

    Raises:
        ConfigError: as :class:`LayerIGTextExplainer`.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, layer: str | None = None, max_length: int | None = None):
        # no baseline is used; one is only needed to pad a batch when the tokenizer has no PAD token
        padding = next((b for b in BASELINES if getattr(tokenizer, f"{b}_token_id", None) is not None), "pad")
        super().__init__(model, tokenizer, layer=layer, baseline=padding, max_length=max_length)

    def _attribute(self, ids, extra, classes, content, keeps, words):
        with torch.inference_mode(False), torch.enable_grad():
            attributions = LayerGradientXActivation(self._score, self.layer).attribute(
                ids, additional_forward_args=(classes, *extra)
            )
        if not isinstance(attributions, torch.Tensor) or attributions.shape[:2] != ids.shape:
            raise ConfigError(f"layer {self.layer_name!r} must output a (batch, seq, ...) tensor")
        return attributions.detach().double().flatten(2).sum(-1).cpu(), None


class OcclusionTextExplainer(_TextAttribution):
    """Word occlusion: a word's attribution is ``F(x) - F(x with that word occluded)``,
    the drop of the target **logit** (minus the contrast logit), where ``F`` is that
    of :class:`LayerIGTextExplainer`. Logits rather than probabilities, so that the
    attribution is linear in the logits: the contrastive attribution is exactly the
    target's minus the contrast's, and one word's effect does not shrink because the
    softmax is saturated.

    A word is the group of pieces :func:`~tsexplain.text_attribution.word_pieces`
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
        model, tokenizer, layer, baseline, max_length: as for
            :class:`LayerIGTextExplainer`.
        internal_batch_size: rows per forward pass (occluded variants of the batch).
        max_words: the most words a text may have; a longer one is a request error
            (413, ``too_many_words``): the cost grows with the word count. None: no
            limit beyond ``max_length``.

    Raises:
        ConfigError: as :class:`LayerIGTextExplainer`, or invalid numbers.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        layer: str | None = None,
        baseline: str = "pad",
        internal_batch_size: int = DEFAULT_INTERNAL_BATCH_SIZE,
        max_length: int | None = None,
        max_words: int | None = DEFAULT_MAX_WORDS,
    ):
        if not isinstance(internal_batch_size, int) or isinstance(internal_batch_size, bool) or internal_batch_size < 1:
            raise ConfigError(f"internal_batch_size must be a positive int, got {internal_batch_size!r}")
        if max_words is not None and (not isinstance(max_words, int) or isinstance(max_words, bool) or max_words < 1):
            raise ConfigError(f"max_words must be a positive int or None, got {max_words!r}")
        super().__init__(model, tokenizer, layer=layer, baseline=baseline, internal_batch_size=internal_batch_size,
                         max_length=max_length)  # fmt: skip
        self.max_words = max_words

    def _check_words(self, words) -> None:
        for i, text_words in enumerate(words):
            if self.max_words is not None and len(text_words) > self.max_words:
                raise RequestError(
                    f"text {i} has {len(text_words)} words; occlusion explains at most {self.max_words} "
                    "(use a shorter text or another method)", "too_many_words", 413,
                )  # fmt: skip

    def _attribute(self, ids, extra, classes, content, keeps, words):
        batch = ids.shape[0]
        device = ids.device
        content = content.to(device)
        baseline_ids = ids.masked_fill(content, self.baseline_id)
        # feature w of row i = its word w; special tokens and padding share feature 0 and
        # are "ablated" with their own value (a no-op), so they cost no extra pass
        layer_mask = torch.zeros(ids.shape, dtype=torch.long)
        for i, (keep, text_words) in enumerate(zip(keeps, words)):
            for w, (_, _, pieces) in enumerate(text_words):
                layer_mask[i, [keep[k] for k in pieces]] = w
        with torch.inference_mode():
            both = self._layer_output(torch.cat([ids, baseline_ids]), tuple(torch.cat([a, a]) for a in extra))
            own, occluded = both[:batch], both[batch:]
            if own.shape[:2] != ids.shape:
                raise ConfigError(f"layer {self.layer_name!r} must output a (batch, seq, ...) tensor")
            shape = (*ids.shape, *[1] * (own.dim() - 2))
            layer_baselines = torch.where(content.view(shape), occluded, own)
            attributions = LayerFeatureAblation(self._score, self.layer).attribute(
                ids,
                layer_baselines=layer_baselines,
                additional_forward_args=(classes, *extra),
                layer_mask=layer_mask.to(device).view(shape),
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

    def _layer_output(self, ids, extra):
        """The layer's output for ``ids`` (one forward pass, hook removed after)."""
        captured = []
        handle = self.layer.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            self._forward(ids, *extra)
        finally:
            handle.remove()
        if not isinstance(captured[0], torch.Tensor) or captured[0].dim() < 2:
            raise ConfigError(f"layer {self.layer_name!r} must output a (batch, seq, ...) tensor")
        return captured[0]


def make_text_explainer(method: str, model: torch.nn.Module, tokenizer, **options):
    """The explainer for ``method`` (one of :data:`TEXT_METHODS`).

    ``options`` are the constructor arguments of that method's class; arguments
    that the method does not take are dropped (``n_steps`` for occlusion), so one
    set of settings can configure every method.
    """
    classes = {
        "layer_ig": LayerIGTextExplainer,
        "grad_x_input": GradXInputTextExplainer,
        "occlusion": OcclusionTextExplainer,
    }
    if method not in classes:
        raise ConfigError(f"unknown text explanation method {method!r}; known: {list(TEXT_METHODS)}")
    cls = classes[method]
    accepted = inspect.signature(cls.__init__).parameters
    return cls(model, tokenizer, **{k: v for k, v in options.items() if k in accepted})
