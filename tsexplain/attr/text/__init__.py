"""Text attribution: one method per module over a shared :class:`~.model.TextModel`.

- :mod:`.tokens`: the explanation's dataclasses, and how pieces merge into words.
- :mod:`.model`: a sequence classifier with its tokenizer and attributed layer.
- :mod:`.lig`: Layer Integrated Gradients (the default).
- :mod:`.grad_x_input`: gradient x input, one backward pass.
- :mod:`.occlusion`: word occlusion, one forward pass per word.

Every explainer has the same call, ``explain(texts, targets, n_steps=None, top_k=5,
contrast=None)``, and returns :class:`~.tokens.TextExplanation` objects. The
attributed function is the same for all: the target logit, minus the contrast
logit when a ``contrast`` class is given (:func:`~.model.class_score`). All three
methods are linear in it, so a contrastive explanation equals the target's
explanation minus the contrast's.
"""
from __future__ import annotations

import inspect

import torch

from ..names import TEXT_METHODS
from .grad_x_input import GradXInputTextExplainer
from .lig import LayerIGTextExplainer
from .occlusion import OcclusionTextExplainer

TEXT_EXPLAINERS = {"layer_ig": LayerIGTextExplainer, "grad_x_input": GradXInputTextExplainer,
                   "occlusion": OcclusionTextExplainer}
assert tuple(TEXT_EXPLAINERS) == TEXT_METHODS


def options_of(method: str) -> list[str]:
    """The constructor options ``method``'s explainer takes (after model and tokenizer)."""
    return list(inspect.signature(TEXT_EXPLAINERS[method].__init__).parameters)[3:]


def make_text_explainer(method: str, model: torch.nn.Module, tokenizer, **options):
    """The explainer for ``method`` (one of :data:`~tsexplain.attr.names.TEXT_METHODS`).

    ``options`` are the constructor arguments of that method's class; an option it
    does not take raises ``ValueError`` (nothing is dropped silently).
    """
    if method not in TEXT_EXPLAINERS:
        raise ValueError(f"unknown text explanation method {method!r}; known: {list(TEXT_METHODS)}")
    unknown = sorted(set(options) - set(options_of(method)))
    if unknown:
        raise ValueError(f"{method} takes no option(s) {unknown}; it takes {options_of(method)}")
    return TEXT_EXPLAINERS[method](model, tokenizer, **options)
