"""Layer Integrated Gradients for text classifiers (captum), with adaptive steps,
autocast precision and a memory-bounded internal batch.

The entry point is :class:`LayerIGTextExplainer`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Union

import torch
from captum.attr import LayerIntegratedGradients

from ..names import INTEGRATION_METHODS, MAX_TEXT_N_STEPS, PRECISIONS
from .adaptive import AdaptiveSteps, TimeLimits, is_steps, run_schedule
from .model import Encoded, TextModel, class_indices, class_score
from .tokens import TextExplanation

DEFAULT_N_STEPS = "auto"  # adaptive: see AdaptiveSteps
DEFAULT_INTERNAL_BATCH_SIZE = 64
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
__all__ = ["AdaptiveSteps", "LayerIGTextExplainer", "TimeLimits", "ActivationCost", "check_n_steps"]


@dataclass(frozen=True)
class ActivationCost:
    """Memory of one LIG pass, measured by :meth:`LayerIGTextExplainer.measure_activation_cost`.

    ``fixed + rows * (per_token * L + per_token_pair * L**2)`` bytes for ``rows``
    path points of ``L`` tokens (the ``L**2`` term is attention). :meth:`rows_within`
    inverts it.
    """

    fixed: float
    per_token: float
    per_token_pair: float

    def row_bytes(self, length: int) -> float:
        """Bytes one path point of ``length`` tokens adds."""
        return self.per_token * length + self.per_token_pair * length * length

    def rows_within(self, budget_bytes: float, length: int) -> int:
        """The most path points of ``length`` tokens whose estimate fits ``budget_bytes`` (at least 1)."""
        per_row = self.row_bytes(length)
        if per_row <= 0:
            return 1 << 20
        return max(1, int((budget_bytes - self.fixed) // per_row))


class LayerIGTextExplainer:
    """Explains sequence-classification logits with captum's Layer Integrated
    Gradients on one layer of a Hugging Face model (by default its input
    embeddings).

    Attributed function: the **logit** of the target class (not the softmax
    probability). Logits do not saturate, and a class's attributions do not depend
    on the other classes' scores as they would through the softmax; completeness
    is checked against the logit difference. With a ``contrast`` class it is
    ``logit[target] - logit[contrast]`` ("why target rather than contrast"); IG is
    linear in the attributed function, so this equals the difference of the two
    classes' attributions.

    Baseline x': the same token sequence with the tokenizer-added special tokens
    ([CLS]/[SEP], <s>/</s>, ...) kept and every other token replaced by the PAD
    (``baseline="pad"``), UNK (``"unk"``) or MASK (``"mask"``) id. Padding
    positions are identical in x and x' and masked out, so they get exactly zero.
    Special tokens get zero on embedding layers too; on deeper layers they may carry
    attribution, which counts in the delta but is not listed in ``tokens``.

    Convergence delta: the path integral runs from the layer output of x' to that of
    x while the model's other inputs stay those of x, so ``F(x')`` is computed the
    same way: the forward pass of x with the layer output replaced by that of x'.
    For BERT-like models this equals captum's ``f(x')``; for RoBERTa-like models
    (position ids derived from the PAD positions of ``input_ids``) captum's plain
    ``f(x')`` is not the path's end point and would overstate the error.

    Args:
        model, tokenizer, layer, baseline, max_length: see
            :class:`~tsexplain.attr.text.model.TextModel`; left open, the layer and
            baseline are the family's measured defaults (:mod:`.families`: e.g.
            ``deberta.embeddings`` for DeBERTa-v2/v3 without absolute positions,
            whose bare word embedding is normalised, so that from the zero PAD row
            the path only changes near alpha=0 and IG cannot converge there).
        n_steps: ``"auto"`` (default): the ``adaptive`` schedule, until the relative
            delta is within its ``max_relative_delta``; or a fixed number of
            integration steps. Figures per family on briefly trained models:
            README "Convergence by family" (``benchmarks/lig_convergence.py``).
        integration_method: one of :data:`~tsexplain.attr.names.INTEGRATION_METHODS`;
            Gauss-Legendre converges much faster than the Riemann rules.
        internal_batch_size: at most this many (text, step) rows per forward /
            backward pass (raised to the batch size when smaller); bounds memory at
            ``internal_batch_size x seq_len`` activations. None: all rows at once.
            ``"auto"``: derived per call from ``memory_budget_mb`` and the padded
            length, with the cost measured once here (see
            :meth:`measure_activation_cost`); texts are then split into several
            passes when even one step each would not fit.
        memory_budget_mb: activation memory allowed per pass with
            ``internal_batch_size="auto"``.
        precision: ``"fp32"`` (default, the reference), ``"bf16"`` or ``"fp16"``
            (``torch.autocast`` around the path's forward/backward passes; ``fp16``
            needs CUDA), or ``"auto"`` (bf16 on CUDA devices that support it, else
            fp32). Attributions are summed in float64 and the convergence delta is
            taken against the model's fp32 logits, so it includes the rounding error.
        adaptive: the schedule used when ``n_steps="auto"`` (default
            :class:`AdaptiveSteps`).

    Raises:
        ValueError: unknown layer, slow tokenizer, baseline token missing from the
            tokenizer, or invalid numbers.

    The explainer leaves the model as it found it: hooks removed, no ``.grad`` set,
    train/eval flags restored (it runs in eval mode). It enables gradients locally,
    so it works under ``torch.no_grad()``; it also leaves ``torch.inference_mode()``
    locally, but the model's parameters must not be inference tensors: do not
    create or load the model under inference mode.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        layer: str | None = None,
        baseline: str = "auto",
        n_steps: Union[int, str] = DEFAULT_N_STEPS,
        integration_method: str = "gausslegendre",
        internal_batch_size: Union[int, str, None] = DEFAULT_INTERNAL_BATCH_SIZE,
        max_length: int | None = None,
        precision: str = "fp32",
        memory_budget_mb: float = 1024,
        adaptive: Optional[AdaptiveSteps] = None,
    ):
        self.text = TextModel(model, tokenizer, layer, baseline, max_length)
        self.adaptive = AdaptiveSteps() if adaptive is None else adaptive
        self.n_steps = check_n_steps(n_steps)
        if integration_method not in INTEGRATION_METHODS:
            raise ValueError(f"integration_method must be one of {INTEGRATION_METHODS}, got {integration_method!r}")
        self.integration_method = integration_method
        if internal_batch_size not in (None, "auto") and (
            not isinstance(internal_batch_size, int) or internal_batch_size < 1
        ):
            raise ValueError(f"internal_batch_size must be a positive int, 'auto' or None, got {internal_batch_size!r}")
        self.internal_batch_size = internal_batch_size
        if isinstance(memory_budget_mb, bool) or not isinstance(memory_budget_mb, (int, float)) or memory_budget_mb <= 0:
            raise ValueError(f"memory_budget_mb must be a positive number, got {memory_budget_mb!r}")
        self.memory_budget_bytes = float(memory_budget_mb) * 2**20
        self.precision = resolve_precision(precision, self.text.device)
        self.activation_cost = self.measure_activation_cost() if internal_batch_size == "auto" else None

    @property
    def layer_name(self) -> str:
        return self.text.layer_name

    @property
    def max_length(self) -> int:
        return self.text.max_length

    def explain(
        self,
        texts: list[str],
        targets: list[int],
        n_steps: Union[int, str, None] = None,
        top_k: int = 5,
        contrast: list[int | None] | None = None,
        limits: Optional[TimeLimits] = None,
    ) -> list[TextExplanation]:
        """Explain ``targets[i]`` (a class index) for ``texts[i]``.

        Texts are tokenized with truncation to ``max_length`` and padded together
        to the longest of them (no padding beyond it); one captum call covers the
        batch unless ``internal_batch_size="auto"`` splits it. Per-token attribution
        = the layer attribution summed over all non-sequence dimensions (the hidden
        size).

        Args:
            texts: non-empty strings, any Unicode.
            targets: one class index per text.
            n_steps: overrides the explainer's ``n_steps`` for this call: an int,
                or ``"auto"`` for the explainer's :class:`AdaptiveSteps`.
            top_k: number of words in ``top_words`` (largest ``|attribution|`` first).
            contrast: None, or one class index (or None) per text: explain
                ``logit[target] - logit[contrast]`` for that text.
            limits: with adaptive steps, when each text is due (:class:`TimeLimits`):
                a text whose next round would end late keeps its last round's result,
                unconverged (see :mod:`.adaptive`). Ignored with a fixed ``n_steps``.

        Returns:
            One :class:`TextExplanation` per text, in order. ``tokens`` excludes
            special tokens and padding; ``words`` come from
            :func:`~tsexplain.attr.text.tokens.aggregate_words`. ``converged`` is
            whether the relative delta is at most the adaptive schedule's
            ``max_relative_delta``, with fixed steps too.

        Raises:
            EmptyText, UnknownClass, SameClass: see :meth:`TextModel.check`.
            ValueError: other bad arguments.
        """
        texts, targets, contrast = self.text.check(texts, targets, contrast, top_k)
        n_steps = self.n_steps if n_steps is None else check_n_steps(n_steps)
        if not texts:
            return []
        encoded = self.text.encode(texts)
        classes = list(zip(targets, contrast))
        bound = self.adaptive.max_relative_delta
        if n_steps != "auto":
            per_token, absolute, relative = self._integrate(encoded, classes, list(range(len(texts))), n_steps)
            steps_used, converged = n_steps, [bool(r <= bound) for r in relative]
        else:
            if limits is not None and len(limits.seconds_left) != len(texts):
                raise ValueError("need one time limit (or None) per text")
            outcome = run_schedule(lambda indices, steps: self._integrate(encoded, classes, indices, steps),
                                   len(texts), self.adaptive, limits)
            per_token, absolute, relative = outcome.values, outcome.absolute, outcome.relative
            steps_used, converged = outcome.n_steps, outcome.converged
        deltas = [{"absolute": float(a), "relative": float(r)} for a, r in zip(absolute, relative)]
        return self.text.explanations(texts, encoded, per_token, targets, contrast, top_k, n_steps=steps_used,
                                      method=self.integration_method, convergence_delta=deltas,
                                      precision=self.precision, converged=converged)

    def _integrate(self, encoded: Encoded, classes, indices, n_steps):
        """Per-token attributions (float64, padded width) and deltas for texts ``indices``;
        ``classes[i]`` is the (target, contrast or None) pair of text ``i``.

        Texts are sorted by length and padded only to the longest one of each pass;
        with ``internal_batch_size="auto"`` a pass holds as many texts as the memory
        budget allows at their padded length.
        """
        enc, rows = encoded.encoding, encoded.rows
        order = sorted(indices, key=lambda i: len(enc["input_ids"][rows[i]]))
        out = {}
        while order:
            width = len(enc["input_ids"][rows[order[-1]]])
            if self.internal_batch_size == "auto":
                capacity = self.activation_cost.rows_within(self.memory_budget_bytes, width)
                take = min(len(order), capacity)
                # the longest texts first, padded to the longest: the shorter rest may fit more per pass
                chunk, order = order[len(order) - take :], order[: len(order) - take]
                internal = capacity
            else:
                chunk, order = order, []
                internal = None if self.internal_batch_size is None else max(self.internal_batch_size, len(chunk))
            values, absolute, relative = self._integrate_pass(
                encoded, [rows[i] for i in chunk], [classes[i] for i in chunk], n_steps, internal
            )
            for k, i in enumerate(chunk):
                out[i] = (values[k], float(absolute[k]), float(relative[k]))
        return (
            [out[i][0] for i in indices],
            [out[i][1] for i in indices],
            [out[i][2] for i in indices],
        )

    def _integrate_pass(self, encoded: Encoded, rows, pairs, n_steps, internal_batch_size):
        """One captum call over ``rows`` padded together; ``pairs``: (target, contrast) per row."""
        text = self.text
        ids, attention_mask, token_type_ids, content = text.tensors(encoded, rows)
        baseline_ids = ids.masked_fill(content.to(ids.device), text.baseline_id)
        extra = text.extra(attention_mask, token_type_ids)
        classes = class_indices([t for t, _ in pairs], [c for _, c in pairs], ids.device)

        with text.eval_mode():
            attributions = self._lig(ids, baseline_ids, classes, extra, n_steps, internal_batch_size)
            with torch.inference_mode(False), torch.no_grad():
                f_x = class_score(text.forward(ids, *extra), classes)
                f_baseline = class_score(text.forward_from_layer_output_of(ids, baseline_ids, extra), classes)

        if not isinstance(attributions, torch.Tensor) or attributions.shape[:2] != ids.shape:
            raise ValueError(f"layer {text.layer_name!r} must output a (batch, seq, ...) tensor")
        per_token = attributions.detach().double().flatten(2).sum(-1).cpu()
        diff = (f_x.double() - f_baseline.double()).cpu()
        absolute = (per_token.sum(1) - diff).abs()
        relative = absolute / diff.abs().clamp_min(1e-12)
        return per_token, absolute, relative

    def _lig(self, ids, baseline_ids, classes, extra, n_steps, internal_batch_size):
        """captum LayerIntegratedGradients of the score, under autocast when ``precision`` asks for it."""
        with torch.inference_mode(False), torch.enable_grad(), self._autocast():
            lig = LayerIntegratedGradients(self.text.score, self.text.layer)
            return lig.attribute(
                ids,
                baselines=baseline_ids,
                additional_forward_args=(classes, *extra),
                n_steps=n_steps,
                method=self.integration_method,
                internal_batch_size=internal_batch_size,
            )

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.text.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    def measure_activation_cost(self, rows: int = 2) -> ActivationCost:
        """Measure the memory of a LIG pass on this model, precision and device.

        Three probe passes of one synthetic text: ``rows`` and ``2 * rows`` path
        points at ``max_length`` tokens, and ``rows`` at a quarter of it. Each
        counts the bytes of the tensors autograd saves for the backward pass (the
        activations, which dominate and grow with rows and length; parameters
        excluded); on CUDA the peak of ``torch.cuda.max_memory_allocated`` over the
        pass is used when larger. The row difference gives the per-row cost at full
        length and the fixed part, the two lengths split the per-row cost into a
        per-token and a per-token-pair (attention) term.
        """
        long = self.max_length
        short = max(self.text.tokenizer.num_special_tokens_to_add() + 1, long // 4)
        m_long = self._probe_bytes(rows, long)
        m_long2 = self._probe_bytes(2 * rows, long)
        m_short = self._probe_bytes(rows, short)
        per_row_long = (m_long2 - m_long) / rows
        if per_row_long <= 0:  # no measurable growth: charge everything to the rows
            per_row_long, fixed = m_long2 / (2 * rows), 0.0
        else:
            fixed = max(0.0, m_long - rows * per_row_long)
        per_row_short = max(0.0, (m_short - fixed) / rows)
        pair = 0.0
        if long > short:
            pair = max(0.0, (per_row_long / long - per_row_short / short) / (long - short))
        per_token = max(0.0, per_row_long / long - pair * long)
        return ActivationCost(fixed=fixed, per_token=per_token, per_token_pair=pair)

    def _probe_bytes(self, rows, length):
        text = self.text
        device = text.device
        ids = torch.full((1, length), text.baseline_id, dtype=torch.long, device=device)
        attention_mask = torch.ones_like(ids)
        extra = text.extra(attention_mask, torch.zeros_like(ids) if text.uses_token_type_ids else None)
        parameters = {p.untyped_storage().data_ptr() for p in text.model.parameters()}
        saved = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameters:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        with text.eval_mode(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            self._lig(ids, ids, class_indices([0], [None], device), extra, rows, None)
        measured = float(sum(saved.values()))
        if cuda:
            torch.cuda.synchronize(device)
            measured = max(measured, float(torch.cuda.max_memory_allocated(device) - before))
        return measured


def check_n_steps(n_steps):
    """``n_steps`` when it is an int in [1, MAX_TEXT_N_STEPS] or ``"auto"``; ValueError otherwise."""
    if n_steps != "auto" and not is_steps(n_steps):
        raise ValueError(f"n_steps must be an integer in [1, {MAX_TEXT_N_STEPS}] or 'auto', got {n_steps!r}")
    return n_steps


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision ``"auto"`` stands for on ``device``; checks the others.

    ``auto``: ``bf16`` on CUDA devices that support it, else ``fp32`` (on CPU, bf16
    autocast is correct but usually not faster). ``fp16`` needs CUDA.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    cuda = device.type == "cuda"
    if precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not cuda:
        raise ValueError("precision fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return precision
