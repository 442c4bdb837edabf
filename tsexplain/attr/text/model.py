"""A Hugging Face sequence classifier as the text attribution methods see it.

:class:`TextModel` holds what every method shares: the model, its fast tokenizer,
the layer whose output is attributed, the baseline token, the token budget; it
tokenizes a batch, pads it, runs the model and scores the explained classes.
Each method (:mod:`.lig`, :mod:`.grad_x_input`, :mod:`.occlusion`) is a small
class *using* a TextModel, as captum's ``LLMAttribution`` wraps an attribution
method around a model and tokenizer.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ..errors import EmptyText, SameClass, UnknownClass
from ..names import BASELINES
from .families import EMBEDDINGS_OUTPUT, FamilyDefaults, defaults_for, embeddings_owner
from .tokens import TextExplanation, TokenAttribution, aggregate_words, top_words


def class_indices(targets: list[int], contrast: list[int | None], device=None) -> torch.Tensor:
    """``(batch, 2)`` long tensor: target class, contrast class or -1 for none."""
    rows = [[t, -1 if c is None else c] for t, c in zip(targets, contrast)]
    return torch.tensor(rows, dtype=torch.long, device=device)


def class_score(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Per row: ``logits[target]``, minus ``logits[contrast]`` where the row has one.

    ``classes`` comes from :func:`class_indices`. A tensor (not captum's
    ``target``) so that captum expands and slices it with the batch like any other
    forward argument, in every attribution method.
    """
    target = logits.gather(1, classes[:, :1]).squeeze(1)
    contrast = logits.gather(1, classes[:, 1:].clamp_min(0)).squeeze(1)
    return torch.where(classes[:, 1] >= 0, target - contrast, target)


@dataclass
class Encoded:
    """A tokenized batch: the tokenizer's encoding (with overflow rows), the row of
    each text in it, and whether each text was truncated to ``max_length``."""

    encoding: object  # transformers' BatchEncoding
    rows: list[int]
    truncated: list[bool]

    def keep(self, i: int) -> list[int]:
        """Positions of text ``i``'s content tokens (special tokens left out)."""
        return [j for j, special in enumerate(self.encoding["special_tokens_mask"][self.rows[i]]) if not special]

    def offsets(self, i: int, positions: list[int]) -> list[tuple[int, int]]:
        return [tuple(self.encoding["offset_mapping"][self.rows[i]][j]) for j in positions]

    def word_ids(self, i: int, positions: list[int]) -> list[Optional[int]]:
        ids = self.encoding.word_ids(self.rows[i])
        return [ids[j] for j in positions]


class TextModel:
    """A sequence classifier, its tokenizer and the layer attributed.

    Args:
        model: a ``...ForSequenceClassification``-style module called as
            ``model(input_ids=..., attention_mask=..., [token_type_ids=...])`` and
            returning ``.logits`` (or a tuple / tensor of logits) of shape
            ``(batch, num_labels)``.
        tokenizer: a *fast* Hugging Face tokenizer (offsets and word ids needed).
        layer: dotted module name inside ``model`` whose output is attributed, e.g.
            ``"bert.embeddings.word_embeddings"``; its output must be a tensor of
            shape ``(batch, seq, ...)``. None: the family's measured default
            (:mod:`.families`: the embeddings' output for RoBERTa, XLM-R and DeBERTa
            without absolute positions), else ``model.get_input_embeddings()``.
        baseline: the token every content token is replaced by in the baseline:
            ``"pad"``, ``"unk"`` or ``"mask"``, or ``"auto"`` (default): the family's
            measured default (MASK for ModernBERT), else PAD.
        max_length: token budget per text, special tokens included. None: the
            tokenizer's ``model_max_length`` capped by the model's usable position
            embeddings.

    Raises:
        ValueError: unknown layer, slow tokenizer, baseline token missing from the
            tokenizer, or a bad ``max_length``.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, layer: str | None = None, baseline: str = "auto",
                 max_length: int | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("a fast (Rust) tokenizer is required for character offsets")
        self.model = model
        self.tokenizer = tokenizer
        family = defaults_for(model)
        self.layer_name, self.layer = _resolve_layer(model, layer, family)
        self.baseline = family.baseline if baseline == "auto" else baseline
        self.baseline_id = _baseline_id(tokenizer, self.baseline)
        self.device = _device(model)
        self.max_length = _max_length(model, tokenizer, max_length)
        self.num_labels = getattr(getattr(model, "config", None), "num_labels", None)
        parameters = inspect.signature(model.forward).parameters
        self.uses_token_type_ids = "token_type_ids" in parameters
        self.position_padding_idx = _position_padding_idx(model) if "position_ids" in parameters else None

    # -- requests ----------------------------------------------------------------

    def check(self, texts, targets, contrast=None, top_k: int = 5) -> tuple[list, list, list]:
        """``(texts, targets, contrasts)`` checked: one target class per text and one
        contrast class or None per text (None: none for all).

        Raises:
            EmptyText: an empty or whitespace-only text.
            UnknownClass: a target or contrast outside ``[0, num_labels)``.
            SameClass: a contrast equal to its text's target.
            ValueError: other bad arguments.
        """
        if not isinstance(texts, (list, tuple)) or not isinstance(targets, (list, tuple)):
            raise ValueError("texts and targets must be lists")
        if len(texts) != len(targets):
            raise ValueError("need exactly one target per text")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"text {i} is not a string")
            if not text.strip():
                raise EmptyText(f"text {i} is empty or whitespace-only")
        for target in targets:
            self._check_class(target, "target")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
            raise ValueError("top_k must be a non-negative integer")
        if contrast is None:
            contrast = [None] * len(targets)
        if not isinstance(contrast, (list, tuple)) or len(contrast) != len(targets):
            raise ValueError("need one contrast (or None) per text")
        for c, target in zip(contrast, targets):
            if c is not None:
                self._check_class(c, "contrast")
                if c == target:
                    raise SameClass(f"contrast {c} is the target itself")
        return list(texts), list(targets), list(contrast)

    def _check_class(self, value, field: str) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise UnknownClass(f"{field} classes must be integers", field)
        if value < 0 or (self.num_labels is not None and value >= self.num_labels):
            raise UnknownClass(f"{field} {value} is outside [0, {self.num_labels})", field)

    # -- tokens ------------------------------------------------------------------

    def encode(self, texts: list[str]) -> Encoded:
        """Encode with truncation to ``max_length``; overflow rows tell which texts did not fit."""
        enc = self.tokenizer(
            texts,
            truncation=True,
            max_length=self.max_length,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        mapping = list(enc["overflow_to_sample_mapping"])
        rows = [mapping.index(i) for i in range(len(texts))]
        truncated = [mapping.count(i) > 1 for i in range(len(texts))]
        for i, row in enumerate(rows):
            if all(enc["special_tokens_mask"][row]):
                raise EmptyText(f"text {i} has no tokens")
        return Encoded(enc, rows, truncated)

    def tensors(self, encoded: Encoded, rows: list[int]):
        """``(ids, attention_mask, token_type_ids or None, content)`` of the encoding's
        ``rows``, right-padded to the longest; ``content`` (on the CPU) marks
        non-special, non-pad tokens.

        Special tokens are the ones the tokenizer's post-processor added (the
        encoding's ``special_tokens_mask``), not every id in ``all_special_ids``:
        an unknown word encoded as UNK is content.
        """
        enc = encoded.encoding
        width = max(len(enc["input_ids"][row]) for row in rows)
        pad_id = self.tokenizer.pad_token_id
        shape = (len(rows), width)
        ids = torch.full(shape, self.baseline_id if pad_id is None else pad_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        content = torch.zeros(shape, dtype=torch.bool)
        with_types = self.uses_token_type_ids and "token_type_ids" in enc
        token_type_ids = torch.full(shape, self.tokenizer.pad_token_type_id, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(enc["input_ids"][row])
            ids[i, :n] = torch.tensor(enc["input_ids"][row])
            attention_mask[i, :n] = 1
            content[i, :n] = torch.tensor(enc["special_tokens_mask"][row]) == 0
            if with_types:
                token_type_ids[i, :n] = torch.tensor(enc["token_type_ids"][row])
        device = self.device
        return ids.to(device), attention_mask.to(device), token_type_ids.to(device) if with_types else None, content

    @staticmethod
    def extra(attention_mask, token_type_ids) -> tuple:
        """The forward arguments after ``input_ids``."""
        return (attention_mask,) if token_type_ids is None else (attention_mask, token_type_ids)

    # -- the model ---------------------------------------------------------------

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """The logits. RoBERTa-like models (position ids derived from the PAD positions of
        ``input_ids``) get explicit position ids: a PAD token (the position embeddings'
        ``padding_idx``, their PAD id) gets the padding position,
        every other token its place in the sequence, as their own rule gives for a
        right-padded input. A baseline's special tokens then keep the input's positions
        (the model's rule would shift the ones after the PAD tokens)."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if self.position_padding_idx is not None:
            pad = self.position_padding_idx
            places = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids) + pad + 1
            kwargs["position_ids"] = torch.where(input_ids == pad, pad, places)
        out = self.model(**kwargs)
        if hasattr(out, "logits"):
            return out.logits
        return out[0] if isinstance(out, (tuple, list)) else out

    def score(self, input_ids, classes, *extra) -> torch.Tensor:
        """The attributed function, one value per row (see :func:`class_score`)."""
        return class_score(self.forward(input_ids, *extra), classes)

    def layer_output(self, ids, extra) -> torch.Tensor:
        """The layer's output for ``ids`` (one forward pass, hook removed after)."""
        captured = []
        handle = self.layer.register_forward_hook(lambda module, args, out: captured.append(out))
        try:
            self.forward(ids, *extra)
        finally:
            handle.remove()
        if not isinstance(captured[0], torch.Tensor) or captured[0].dim() < 2:
            raise ValueError(f"layer {self.layer_name!r} must output a (batch, seq, ...) tensor")
        return captured[0]

    def forward_from_layer_output_of(self, ids, other_ids, extra) -> torch.Tensor:
        """Logits of ``ids`` with the layer output replaced by that of ``other_ids``."""
        replacement = self.layer_output(other_ids, extra)
        handle = self.layer.register_forward_hook(lambda module, args, out: replacement)
        try:
            return self.forward(ids, *extra)
        finally:
            handle.remove()

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """The model in eval mode for the block; every module's own flag restored after."""
        modes = {module: module.training for module in self.model.modules()}
        self.model.eval()
        try:
            yield
        finally:
            for module, training in modes.items():
                module.training = training

    # -- answers -----------------------------------------------------------------

    def explanations(self, texts, encoded: Encoded, per_token, targets, contrast, top_k: int,
                     per_word=None, **fields) -> list[TextExplanation]:
        """One :class:`TextExplanation` per text from per-token attributions
        (``per_token[i][j]``: text ``i``, sequence position ``j``). Words sum their
        pieces, unless ``per_word[i]`` gives each word's value (its pieces then share it
        equally). ``fields``: the integration fields, a list per text or one value for all."""
        results = []
        for i, text in enumerate(texts):
            row = encoded.rows[i]
            keep = encoded.keep(i)
            pieces = self.tokenizer.convert_ids_to_tokens(encoded.encoding["input_ids"][row])
            offsets = encoded.offsets(i, keep)
            values = [float(per_token[i][j]) for j in keep]
            tokens = [TokenAttribution(pieces[j], start, end, value)
                      for j, (start, end), value in zip(keep, offsets, values)]
            words = aggregate_words(text, offsets, encoded.word_ids(i, keep), values)
            if per_word is not None:
                for word, value in zip(words, per_word[i]):
                    word.attribution = float(value)
            own = {k: v[i] if isinstance(v, list) else v for k, v in fields.items()}
            results.append(TextExplanation(
                target=targets[i], layer=self.layer_name, tokens=tokens, words=words, top_words=top_words(words, top_k),
                truncated=encoded.truncated[i], contrast=contrast[i], **own))
        return results


def _resolve_layer(model, name, family: FamilyDefaults):
    modules = dict(model.named_modules())
    if name is None:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        found = [n for n, m in modules.items() if m is embeddings]
        if embeddings is None or not found:
            raise ValueError("model has no input embeddings; name a layer (a dotted module name)")
        if family.layer == EMBEDDINGS_OUTPUT:
            owner = embeddings_owner(model, found[0])
            return owner, modules[owner]
        return found[0], embeddings
    if name not in modules or not name:
        raise ValueError(f"layer {name!r} is not a module of {type(model).__name__} (see model.named_modules())")
    return name, modules[name]


def _position_padding_idx(model) -> Optional[int]:
    """The padding position of RoBERTa-like position embeddings (an ``nn.Embedding`` named
    ``position_embeddings`` with a ``padding_idx``), else None."""
    for name, module in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, torch.nn.Embedding):
            return module.padding_idx
    return None


def _baseline_id(tokenizer, baseline):
    if baseline not in BASELINES or baseline == "auto":
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    token_id = getattr(tokenizer, f"{baseline}_token_id", None)
    if token_id is None:
        raise ValueError(f"baseline {baseline!r} needs a {baseline} token, which the tokenizer lacks")
    return token_id


def first_available_baseline(tokenizer) -> str:
    """The first of :data:`BASELINES` whose token the tokenizer has (to pad with)."""
    return next((b for b in BASELINES if getattr(tokenizer, f"{b}_token_id", None) is not None), "pad")


def _max_length(model, tokenizer, max_length):
    """Usable sequence length: explicit value, else the tokenizer's limit capped by
    the position embeddings (RoBERTa-style embeddings start at ``padding_idx + 1``)."""
    minimum = tokenizer.num_special_tokens_to_add() + 1
    if max_length is not None:
        if not isinstance(max_length, int) or max_length < minimum:
            raise ValueError(f"max_length must be an integer >= {minimum}, got {max_length!r}")
        return max_length
    limit = tokenizer.model_max_length
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    for name, module in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, torch.nn.Embedding):
            offset = 0 if module.padding_idx is None else module.padding_idx + 1
            positions = module.num_embeddings - offset
            break
    if positions is not None:
        limit = min(limit, positions)
    return max(limit, minimum)


def _device(model):
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
