"""Layer IG converges by default (issue #15), on a small *trained* model of each family.

The models are trained once per machine on the synthetic reviews and cached under build/families
(tests/trained_hf.py; 1-6 minutes each on the shared 2-core VM, 55-357 s measured). Their training is deterministic only up to
floating point across CPUs, so the thresholds leave margins to the shares measured
(benchmarks/lig_convergence.py on 100 texts, README "Convergence by family"), stated beside each.
First run on a cold cache: 13-17 minutes of training on the shared 2-core VM (7 models), then about 4 minutes.
"""
import statistics

import pytest
import torch

from trained_hf import FAMILIES, heldout, trained_classifier
from tsexplain.attr.text.lig import LayerIGTextExplainer

BOUND = 0.05  # the default max_relative_delta
N_TEXTS = 40  # held-out reviews, the same for every family
N_CONTROL = 16  # the controls run the slow, unconverging settings: fewer texts


def inputs(model, tok, n):
    texts = [s.text for s in heldout(n)]
    enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        targets = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.argmax(-1).tolist()
    return texts, targets


def explain(explainer, texts, targets, batch=8):
    out = []
    for i in range(0, len(texts), batch):
        out += explainer.explain(texts[i:i + batch], targets[i:i + batch])
    return out


def share(results):
    return sum(r.convergence_delta["relative"] <= BOUND for r in results) / len(results)


def input_embeddings(model):
    return next(name for name, module in model.named_modules() if module is model.get_input_embeddings())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_default_converges_on_a_trained_model(family):
    model, tok = trained_classifier(family)
    texts, targets = inputs(model, tok, N_TEXTS)
    results = explain(LayerIGTextExplainer(model, tok), texts, targets)
    for r in results:
        assert type(r.converged) is bool and r.converged == (r.convergence_delta["relative"] <= BOUND)
        assert r.n_steps in (8, 16, 32, 64, 128, 256)
    assert share(results) >= 0.95  # measured on 100 texts (2026-12-02): 1.00, DistilBERT 0.99 (README)


def test_deberta_converges_only_at_its_layer():
    """Control: the word embeddings from the zero PAD row (LayerNorm right after it: the path's change sits
    at alpha < ~0.01) stay unconverged at 256 adaptive steps."""
    model, tok = trained_classifier("deberta-v2")
    texts, targets = inputs(model, tok, N_CONTROL)
    old = LayerIGTextExplainer(model, tok, layer=input_embeddings(model), baseline="pad")
    assert LayerIGTextExplainer(model, tok).layer_name == "deberta.embeddings"
    assert share(explain(old, texts, targets)) <= 0.8  # measured: 0.53 of 100 (0.60 of 40) at up to 256 steps


def test_modernbert_with_a_zero_pad_row_converges_only_from_mask():
    """ModernBERT's PAD embedding is never trained, so it may be anything; set to zero (predictions do not
    change: padding is masked out) a PAD baseline cannot converge, at either layer; the default MASK can."""
    model, tok = trained_classifier("modernbert")
    texts, targets = inputs(model, tok, N_CONTROL)
    default = LayerIGTextExplainer(model, tok)
    assert default.text.baseline == "mask"
    before = explain(default, texts, targets)
    with torch.no_grad():
        model.get_input_embeddings().weight[tok.pad_token_id].zero_()
    after = explain(LayerIGTextExplainer(model, tok), texts, targets)
    for a, b in zip(before, after):  # the PAD row plays no part in the default's answer
        assert a.n_steps == b.n_steps and [t.attribution for t in a.tokens] == [t.attribution for t in b.tokens]
    assert share(after) >= 0.9
    pad = LayerIGTextExplainer(model, tok, baseline="pad")
    assert share(explain(pad, texts, targets)) <= 0.5  # measured: 0.07 of 100 at up to 256 steps


def test_roberta_layer_converges_with_fewer_steps():
    """Control: the word embeddings with the input's positions in the baseline are much further from
    converged at 50 steps (measured on 100 texts, 2026-12-02: median relative delta 2.3e-3 against 3.1e-7
    at the default layer; share within the bound 0.86 against 1.00). The medians differ by 7000x, so the
    100x asked for here holds on any machine; the shares are too close for 40 texts."""
    model, tok = trained_classifier("roberta")
    texts, targets = inputs(model, tok, N_TEXTS)
    default = LayerIGTextExplainer(model, tok, n_steps=50)
    old = LayerIGTextExplainer(model, tok, layer=input_embeddings(model), n_steps=50)
    assert default.layer_name == "roberta.embeddings"
    ours, theirs = explain(default, texts, targets), explain(old, texts, targets)
    assert share(ours) >= 0.95
    assert median_delta(theirs) > 100 * median_delta(ours)


def median_delta(results):
    return statistics.median(r.convergence_delta["relative"] for r in results)
