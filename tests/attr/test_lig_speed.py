"""The LIG speed-ups: precision (autocast), padding, memory-budget chunking, adaptive steps."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiny_hf import tiny_classifier  # noqa: E402
from tsexplain.attr.text.lig import (  # noqa: E402
    ActivationCost,
    AdaptiveSteps,
    LayerIGTextExplainer,
    resolve_precision,
)

TEXTS = [
    "the movie was unbelievably good , i loved it",
    "bad film",
    "a quiet and slow story about nothing much at all",
    "great",
]
TARGETS = [0, 1, 2, 0]
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def token_values(explanation):
    return torch.tensor([t.attribution for t in explanation.tokens], dtype=torch.float64)


def record_widths(model):
    """Forward pre-hook recording each forward's (rows, width); returns (list, handle)."""
    seen = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    return seen, handle


# --- precision ------------------------------------------------------------------------


def test_fp32_is_the_default_and_auto_is_fp32_on_cpu():
    model, tok = tiny_classifier("bert")
    default = LayerIGTextExplainer(model, tok).explain(TEXTS, TARGETS)
    for precision in ("fp32", "auto"):
        explainer = LayerIGTextExplainer(model, tok, precision=precision)
        assert explainer.precision == "fp32"
        for a, b in zip(default, explainer.explain(TEXTS, TARGETS)):
            assert a == b  # bit-identical: fp32 runs no autocast at all
    assert default[0].precision == "fp32"


def input_embeddings(model):
    return next(name for name, module in model.named_modules() if module is model.get_input_embeddings())


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_bf16_on_cpu_is_close_to_fp32(family):
    model, tok = tiny_classifier(family)
    # the word embeddings, as these bounds were set for (RoBERTa's default layer is after the LayerNorm,
    # where bf16 rounds the 50-step delta to 0.28 against 0.25 here)
    fixed = {"n_steps": 50, "layer": input_embeddings(model)}
    reference = LayerIGTextExplainer(model, tok, **fixed).explain(TEXTS, TARGETS)
    low = LayerIGTextExplainer(model, tok, precision="bf16", **fixed).explain(TEXTS, TARGETS)
    for a, b in zip(reference, low):
        assert b.precision == "bf16"
        x, y = token_values(a), token_values(b)
        if len(x) > 1:
            assert torch.corrcoef(torch.stack([x, y]))[0, 1] > 0.99
        assert a.top_words[0].word == b.top_words[0].word
        assert not torch.equal(x, y)  # autocast really ran
        # delta against the fp32 logits: bf16 rounding shows, but stays small
        assert b.convergence_delta["relative"] < 0.25


def test_precision_checks():
    cpu = torch.device("cpu")
    assert resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", cpu)


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("precision", ["bf16", "fp16", "auto"])
def test_low_precision_on_cuda_is_close_to_fp32(precision):
    model, tok = tiny_classifier("bert")
    model = model.to("cuda")
    try:
        reference = LayerIGTextExplainer(model, tok, n_steps=50).explain(TEXTS, TARGETS)
        explainer = LayerIGTextExplainer(model, tok, precision=precision, n_steps=50)
        if precision == "auto":
            assert explainer.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
        for a, b in zip(reference, explainer.explain(TEXTS, TARGETS)):
            x, y = token_values(a), token_values(b)
            assert torch.corrcoef(torch.stack([x, y]))[0, 1] > 0.99 if len(x) > 1 else True
            assert a.top_words[0].word == b.top_words[0].word
    finally:
        model.to("cpu")


# --- padding ------------------------------------------------------------------------


def test_padding_stops_at_the_longest_text_of_the_group():
    model, tok = tiny_classifier("bert")
    explainer = LayerIGTextExplainer(model, tok, n_steps=8)
    lengths = [len(tok(t)["input_ids"]) for t in TEXTS]
    assert len(set(lengths)) > 1 and max(lengths) < explainer.max_length
    seen, handle = record_widths(model)
    try:
        together = explainer.explain(TEXTS, TARGETS)
        assert {width for _, width in seen} == {max(lengths)}
        seen.clear()
        alone = explainer.explain([TEXTS[3]], [TARGETS[3]])[0]
        assert {width for _, width in seen} == {lengths[3]}
    finally:
        handle.remove()
    # padding is masked: the short text's answer does not depend on its company
    assert torch.allclose(token_values(alone), token_values(together[3]), atol=1e-5)


# --- internal batch size from a memory budget ---------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    fixed=st.floats(0, 1e7),
    per_token=st.floats(1, 1e6),
    pair=st.floats(0, 1e4),
    budget=st.floats(1, 1e11),
    length=st.integers(1, 4096),
)
def test_rows_within_budget_rule(fixed, per_token, pair, budget, length):
    cost = ActivationCost(fixed, per_token, pair)
    rows = cost.rows_within(budget, length)
    assert rows >= 1
    if rows > 1:  # more than one row only when the estimate fits
        assert fixed + rows * cost.row_bytes(length) <= budget * (1 + 1e-9)
    assert fixed + (rows + 1) * cost.row_bytes(length) > budget * (1 - 1e-9)  # and as many as fit
    assert cost.rows_within(budget, length + 1) <= rows  # monotone in length
    assert cost.rows_within(budget * 2, length) >= rows  # and in budget


def test_activation_cost_is_measured_on_the_model():
    model, tok = tiny_classifier("bert")
    explainer = LayerIGTextExplainer(model, tok, internal_batch_size="auto")
    cost = explainer.activation_cost
    hidden = model.config.hidden_size
    # at least one fp32 hidden vector per token and layer is kept for the backward pass
    assert cost.per_token >= 4 * hidden * model.config.num_hidden_layers
    assert cost.row_bytes(64) > cost.row_bytes(16)
    # the same model under bf16 autocast keeps smaller activations
    low = LayerIGTextExplainer(model, tok, internal_batch_size="auto", precision="bf16").activation_cost
    assert low.row_bytes(64) < cost.row_bytes(64)


def test_memory_budget_splits_passes_and_keeps_the_answer():
    model, tok = tiny_classifier("bert")
    reference = LayerIGTextExplainer(model, tok, n_steps=16, internal_batch_size=None).explain(TEXTS, TARGETS)
    probe = LayerIGTextExplainer(model, tok, internal_batch_size="auto")
    longest = max(len(tok(t)["input_ids"]) for t in TEXTS)
    # room for 3 path points of the longest text: fewer than the 4 texts, so they are split
    budget = probe.activation_cost.fixed + 3.5 * probe.activation_cost.row_bytes(longest)
    explainer = LayerIGTextExplainer(model, tok, n_steps=16, internal_batch_size="auto",
                                     memory_budget_mb=budget / 2**20)
    seen, handle = record_widths(model)
    try:
        result = explainer.explain(TEXTS, TARGETS)
        whole = len(seen)
        seen_whole = seen[:]
        seen.clear()
        LayerIGTextExplainer(model, tok, n_steps=16, internal_batch_size=None).explain(TEXTS, TARGETS)
        unsplit = len(seen)
    finally:
        handle.remove()
    seen = seen_whole
    cost = explainer.activation_cost
    assert whole > 4 * unsplit  # 16 steps in passes of at most 3 rows
    assert len({width for _, width in seen}) > 1  # the short text went in a pass padded less
    for rows, width in seen:
        assert rows == 1 or cost.fixed + rows * cost.row_bytes(width) <= explainer.memory_budget_bytes
    for a, b in zip(reference, result):
        assert torch.allclose(token_values(a), token_values(b), atol=1e-5)
        assert b.convergence_delta["absolute"] == pytest.approx(a.convergence_delta["absolute"], abs=1e-5)


# --- adaptive n_steps ---------------------------------------------------------------

SCHEDULE = AdaptiveSteps(start=2, max=128, max_relative_delta=0.01)


def spy_attribute(explainer):
    calls = []
    original = explainer._integrate

    def wrapper(encoded, classes, indices, n_steps):
        out = original(encoded, classes, indices, n_steps)
        calls.append((list(indices), n_steps, out[2]))
        return out

    explainer._integrate = wrapper
    return calls


def test_adaptive_recomputes_only_unconverged_texts_and_meets_the_bound():
    # DistilBERT's ReLU head converges slowly: the texts need different step counts
    model, tok = tiny_classifier("distilbert")
    explainer = LayerIGTextExplainer(model, tok, n_steps="auto", adaptive=SCHEDULE)
    calls = spy_attribute(explainer)
    result = explainer.explain(TEXTS, TARGETS)
    assert len(calls) > 1 and len({r.n_steps for r in result}) > 1
    assert calls[0][0] == list(range(len(TEXTS))) and calls[0][1] == SCHEDULE.start
    for (indices, steps, relative), (next_indices, next_steps, _) in zip(calls, calls[1:]):
        assert next_indices == [i for i, r in zip(indices, relative) if r > SCHEDULE.max_relative_delta]
        assert next_steps == min(2 * steps, SCHEDULE.max)
    for r in result:
        assert r.converged is True
        assert r.convergence_delta["relative"] <= SCHEDULE.max_relative_delta


def test_adaptive_equals_a_direct_call_at_the_final_steps():
    model, tok = tiny_classifier("distilbert")
    result = LayerIGTextExplainer(model, tok, n_steps="auto", adaptive=SCHEDULE).explain(TEXTS, TARGETS)
    fixed = LayerIGTextExplainer(model, tok)
    for text, target, r in zip(TEXTS, TARGETS, result):
        direct = fixed.explain([text], [target], n_steps=r.n_steps)[0]
        assert direct.n_steps == r.n_steps
        assert direct.converged is (direct.convergence_delta["relative"] <= fixed.adaptive.max_relative_delta)
        assert torch.allclose(token_values(direct), token_values(r), atol=1e-5)
        # the same up to float32 rounding of the logits, which the batch's padding changes (logit units)
        assert direct.convergence_delta["absolute"] == pytest.approx(r.convergence_delta["absolute"], abs=1e-5)


def test_adaptive_reports_an_unreachable_bound():
    model, tok = tiny_classifier("distilbert")
    schedule = AdaptiveSteps(start=1, max=2, max_relative_delta=1e-9)
    result = LayerIGTextExplainer(model, tok, n_steps="auto", adaptive=schedule).explain(TEXTS, TARGETS)
    assert all(r.n_steps == 2 and r.converged is False for r in result)


def test_adaptive_schedule_checks():
    for bad in [(0, 8, 0.05), (16, 8, 0.05), (1, 2000, 0.05), (1, 8, 0), (1, 8, float("nan"))]:
        with pytest.raises(ValueError):
            AdaptiveSteps(*bad)
