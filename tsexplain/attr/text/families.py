"""Per-family defaults for the attributed layer and the baseline token, measured.

Layer IG integrates along a straight line from the baseline to the input in the
attributed layer's output space. Where that line crosses a normalisation that
erases scale, or starts from a vector the model never trained, the integrand is
concentrated in a few narrow spikes and a fixed number of steps misses them. The
families below got a default that removes the cause, measured on models of each
family trained briefly on the synthetic reviews (``tests/trained_hf.py``; figures
in README "Convergence by family" and ``benchmarks/lig_convergence.py``):

- **DeBERTa-v2/v3** without absolute positions (``position_biased_input: false``,
  the released checkpoints' setting) and **DeBERTa** (v1, same embeddings code):
  the embeddings are ``LayerNorm(word embedding)`` and the PAD row is zero
  (``padding_idx``). ``LayerNorm(alpha * e)`` does not depend on ``alpha`` once
  ``alpha * |e|`` is well above ``sqrt(eps)`` (eps 1e-7), so the path's whole
  change sits in ``alpha < ~0.01``: 94-97% of the score's total variation along the
  path, measured. Attributing the embeddings' output (after the LayerNorm) makes
  the path linear in the normalised space.
- **ModernBERT**: also ``LayerNorm(token embedding)``, without a bias, and its
  PAD row is never trained (``padding_idx`` stops its gradient; transformers'
  init leaves it random). A PAD baseline therefore starts from an arbitrary
  vector, and where that row is zero the same step at ``alpha ~ 0`` appears; at the
  embeddings' output the zero baseline is rescaled again by the next pre-norm
  layer, so moving the layer does not help (both measured: 2-3% of texts within
  0.05 at 50 steps). The MASK token (trained by masked language modelling in a
  released ModernBERT) is a full-norm embedding: no step.
- **RoBERTa**, **XLM-RoBERTa**: position ids are derived from the PAD positions
  of ``input_ids``. At the embeddings' output the PAD baseline is what RoBERTa
  computes for padding (the zero PAD row at the zero padding position), and the
  path from it converged 2-4 times faster than the word-embedding path (whose
  baseline keeps the input's positions; that path at the embeddings' output did not
  converge faster: measured, the position-free start is what helps). Special
  tokens keep the input's positions (:meth:`TextModel.forward
  <tsexplain.attr.text.model.TextModel.forward>` passes explicit position ids), so
  they get no attribution.

Other families (BERT, DistilBERT, ELECTRA, ALBERT, ...) keep the input embeddings
and the PAD baseline: their paths converge with adaptive steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

EMBEDDINGS_OUTPUT = "embeddings output"  # the module that owns the input embeddings


@dataclass(frozen=True)
class FamilyDefaults:
    """What a family's model is explained at when the configuration leaves it open.

    ``layer``: None (the input embeddings) or :data:`EMBEDDINGS_OUTPUT`;
    ``baseline``: a token name of :data:`~tsexplain.attr.names.BASELINES`.
    """

    layer: Optional[str] = None
    baseline: str = "pad"


STANDARD = FamilyDefaults()
AFTER_NORM = FamilyDefaults(layer=EMBEDDINGS_OUTPUT)
FAMILIES = {  # config.model_type: defaults
    "roberta": AFTER_NORM,
    "xlm-roberta": AFTER_NORM,
    "deberta": AFTER_NORM,  # only without absolute positions, see defaults_for
    "deberta-v2": AFTER_NORM,
    "modernbert": FamilyDefaults(baseline="mask"),
}


def family_of(model: torch.nn.Module) -> Optional[str]:
    """The model's ``config.model_type`` (None without a config)."""
    return getattr(getattr(model, "config", None), "model_type", None)


def defaults_for(model: torch.nn.Module) -> FamilyDefaults:
    """The measured defaults of ``model``'s family (:data:`STANDARD` for the others).

    DeBERTa with absolute positions added before its LayerNorm
    (``position_biased_input: true``) is not scale-invariant there: standard.
    """
    family = family_of(model)
    if family in ("deberta", "deberta-v2") and getattr(model.config, "position_biased_input", False):
        return STANDARD
    return FAMILIES.get(family, STANDARD)


def embeddings_owner(model: torch.nn.Module, embeddings_name: str) -> str:
    """The dotted name of the module that owns the input embeddings (``bert.embeddings``
    for ``bert.embeddings.word_embeddings``); ValueError when they sit at the top."""
    if "." not in embeddings_name:
        raise ValueError(f"the input embeddings {embeddings_name!r} have no owning module")
    return embeddings_name.rsplit(".", 1)[0]
