"""Text methods (layer_ig, grad_x_input, occlusion) and contrast, on every tiny HF family.

Each method is checked against an independent computation: captum's own
LayerIntegratedGradients, plain autograd, and a direct loop that edits token ids.
"""

import inspect
import re

import pytest
import torch
from captum.attr import LayerIntegratedGradients

from tiny_hf import FAMILIES, tiny_classifier
from tsexplain.attr.errors import SameClass, TooManyWords, UnknownClass
from tsexplain.attr.names import TEXT_METHODS
from tsexplain.attr.text import make_text_explainer
from tsexplain.attr.text.grad_x_input import GradXInputTextExplainer
from tsexplain.attr.text.occlusion import OcclusionTextExplainer

TEXTS = ["the movie was unbelievably good , i loved it", "bad film"]
TARGETS, CONTRASTS = [0, 2], [1, 0]
N_STEPS = 8  # parity and linearity do not need convergence
ROBERTA_POSITIONS = ("roberta", "xlm-roberta")  # position ids derived from the PAD positions of input_ids
# The families' default layers (tsexplain.attr.text.families): the embeddings module's output.
# DeBERTa-v3 style: LayerNorm(word embedding) with no positions is scale-invariant, so at the word
# embeddings grad x input is zero (Euler) and IG from a zero PAD row cannot converge. RoBERTa-like:
# the PAD baseline there is RoBERTa's own padding (no position), from which IG converges faster.
LAYER = {"deberta-v2": "deberta.embeddings", "roberta": "roberta.embeddings", "xlm-roberta": "roberta.embeddings"}
# internal_batch_size 3: LIG integrates and occlusion ablates in several chunks
OPTIONS = {"layer_ig": {"n_steps": N_STEPS, "internal_batch_size": 3}, "grad_x_input": {},
           "occlusion": {"internal_batch_size": 3}}


def layer_of(model, family):
    return dict(model.named_modules())[LAYER[family]] if family in LAYER else model.get_input_embeddings()


def roberta_positions(ids, pad_id):
    """RoBERTa's rule for a right-padded input, applied to every token: a PAD token gets the padding
    position, every other token its place. A baseline (content replaced by PAD) thus keeps its special
    tokens where the input has them, where RoBERTa's own rule would move the ones after the PAD tokens."""
    places = pad_id + 1 + torch.arange(ids.shape[1]).expand_as(ids)
    return torch.where(ids == pad_id, pad_id, places)


def model_inputs(model, enc):
    accepted = inspect.signature(model.forward).parameters
    return {k: v for k, v in enc.items() if k in accepted}


def encode(tok, texts):
    enc = tok(texts, padding=True, return_tensors="pt", return_special_tokens_mask=True)
    content = (enc.pop("special_tokens_mask") == 0) & (enc["attention_mask"] == 1)
    return enc, content


def scores(logits, targets, contrasts=None):
    rows = torch.arange(len(targets))
    out = logits[rows, targets]
    return out if contrasts is None else out - logits[rows, contrasts]


def assert_clean(model):
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
        assert not module.training
    assert all(p.grad is None for p in model.parameters())


def words_by_spaces(text, offsets):
    """Piece indices of each whitespace-separated word: pieces inside the word's span,
    plus pieces with no characters of their own (a lone "▁") before it."""
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    groups, pending = [[] for _ in spans], []
    for k, (start, end) in enumerate(offsets):
        piece = text[start:end]
        start, end = start + len(piece) - len(piece.lstrip()), end - len(piece) + len(piece.rstrip())
        if start >= end:
            pending.append(k)
            continue
        (w,) = [i for i, (a, b) in enumerate(spans) if a <= start and end <= b]
        groups[w] += pending + [k]
        pending = []
    groups[-1] += pending
    return groups


# --- independent computations: per content token (layer_ig, grad_x_input) or per word (occlusion)


def captum_lig(model, tok, family, targets, contrasts=None):
    enc, content = encode(tok, TEXTS)
    inputs = model_inputs(model, enc)
    ids = inputs.pop("input_ids")
    names = list(inputs)
    baselines = ids.masked_fill(content, tok.pad_token_id)

    def forward(input_ids, *extra):
        positions = {"position_ids": roberta_positions(input_ids, tok.pad_token_id)} if family in ROBERTA_POSITIONS else {}
        return model(input_ids=input_ids, **dict(zip(names, extra)), **positions).logits

    lig = LayerIntegratedGradients(forward, layer_of(model, family))
    attr = lig.attribute(ids, baselines=baselines, target=targets, additional_forward_args=tuple(inputs.values()),
                         n_steps=N_STEPS, method="gausslegendre").sum(-1)  # fmt: skip
    return [attr[i][content[i]].tolist() for i in range(len(TEXTS))]


def autograd_grad_x_input(model, tok, family, targets, contrasts=None):
    enc, content = encode(tok, TEXTS)
    captured = []
    handle = layer_of(model, family).register_forward_hook(lambda m, a, out: captured.append(out))
    try:
        with torch.enable_grad():
            logits = model(**model_inputs(model, enc)).logits
            (grad,) = torch.autograd.grad(scores(logits, targets, contrasts).sum(), captured[0])
    finally:
        handle.remove()
    attr = (grad * captured[0]).sum(-1).detach()
    return [attr[i][content[i]].tolist() for i in range(len(TEXTS))]


def occlusion_loop(model, tok, family, targets, contrasts=None):
    """Per text alone: replace each word's token ids by PAD and take the score drop."""
    out = []
    for i, text in enumerate(TEXTS):
        enc = tok([text], return_tensors="pt", return_special_tokens_mask=True, return_offsets_mapping=True)
        content = enc.pop("special_tokens_mask")[0] == 0
        offsets = enc.pop("offset_mapping")[0][content].tolist()
        inputs = model_inputs(model, enc)
        positions = content.nonzero().flatten()

        def score(ids):
            # RoBERTa: the occluded pieces become padding (no position), the other tokens do not move
            extra = {"position_ids": roberta_positions(ids, tok.pad_token_id)} if family in ROBERTA_POSITIONS else {}
            logits = model(**{**inputs, "input_ids": ids}, **extra).logits
            return scores(logits, [targets[i]], None if contrasts is None else [contrasts[i]]).item()

        with torch.no_grad():
            full = score(inputs["input_ids"])
            drops = []
            for pieces in words_by_spaces(text, offsets):
                ids = inputs["input_ids"].clone()
                ids[0, positions[pieces]] = tok.pad_token_id
                drops.append(full - score(ids))
        out.append(drops)
    return out


def expected_values(method, model, tok, family, targets, contrasts=None):
    if method == "layer_ig":
        return captum_lig(model, tok, family, targets, contrasts)
    if method == "grad_x_input":
        return autograd_grad_x_input(model, tok, family, targets, contrasts)
    return occlusion_loop(model, tok, family, targets, contrasts)


def values(method, explanation):
    items = explanation.words if method == "occlusion" else explanation.tokens
    return [item.attribution for item in items]


def assert_close(got, want, rel=1e-4):
    got, want = torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64)
    assert got.shape == want.shape
    assert torch.allclose(got, want, rtol=0, atol=rel * want.abs().max().item()), (got, want)


# --- every method on every family ----------------------------------------------------------


@pytest.mark.parametrize("method", TEXT_METHODS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_method_on_family(family, method):
    model, tok = tiny_classifier(family)
    explainer = make_text_explainer(method, model, tok, **OPTIONS[method])  # the family's default layer
    assert explainer.layer_name == LAYER.get(family, next(n for n, m in model.named_modules()
                                                          if m is model.get_input_embeddings()))
    with torch.no_grad():  # the explainer must enable gradients itself where it needs them
        plain = explainer.explain(TEXTS, TARGETS, top_k=2)
    other = explainer.explain(TEXTS, CONTRASTS)
    contrastive = explainer.explain(TEXTS, TARGETS, contrast=CONTRASTS)
    assert_clean(model)

    # against an independent computation (batch of two padded texts; occlusion: each text alone)
    for explanation, want in zip(plain, expected_values(method, model, tok, family, TARGETS)):
        assert_close(values(method, explanation), want)
        assert max(abs(v) for v in want) > 1e-3  # a non-trivial model
    # contrast: the method is linear in the attributed logit, so target - contrast = difference of maps
    for a, b, ab in zip(plain, other, contrastive):
        assert ab.contrast is not None and a.contrast is None
        difference = [x - y for x, y in zip(values(method, a), values(method, b))]
        assert_close(values(method, ab), difference)
        assert_close([w.attribution for w in ab.words], [x.attribution - y.attribution for x, y in zip(a.words, b.words)])

    for text, explanation in zip(TEXTS, plain):
        assert [w.word for w in explanation.words] == text.split()
        for w in explanation.words:
            assert text[w.start : w.end] == w.word
        assert sum(t.attribution for t in explanation.tokens) == pytest.approx(
            sum(w.attribution for w in explanation.words), abs=1e-9
        )
        assert explanation.top_words == sorted(explanation.words, key=lambda w: -abs(w.attribution))[:2]
        if method == "layer_ig":
            assert explanation.n_steps == N_STEPS and set(explanation.convergence_delta) == {"absolute", "relative"}
        else:
            assert explanation.n_steps is None and explanation.method is None and explanation.convergence_delta is None


def test_contrastive_occlusion_is_the_drop_of_the_logit_difference():
    model, tok = tiny_classifier("bert")
    got = OcclusionTextExplainer(model, tok).explain(TEXTS, TARGETS, contrast=CONTRASTS)
    for explanation, want in zip(got, occlusion_loop(model, tok, "bert", TARGETS, CONTRASTS)):
        assert_close(values("occlusion", explanation), want)


def test_grad_x_input_contrast_against_autograd():
    model, tok = tiny_classifier("roberta")
    got = GradXInputTextExplainer(model, tok).explain(TEXTS, TARGETS, contrast=CONTRASTS)
    for explanation, want in zip(got, autograd_grad_x_input(model, tok, "roberta", TARGETS, CONTRASTS)):
        assert_close(values("grad_x_input", explanation), want)


def test_occlusion_keeps_roberta_positions():
    """Replacing ids by PAD would shift RoBERTa's position ids; occlusion at the layer does not."""
    model, tok = tiny_classifier("roberta")
    got = OcclusionTextExplainer(model, tok).explain(TEXTS[:1], TARGETS[:1])[0]
    enc = tok(TEXTS[:1], return_tensors="pt", return_special_tokens_mask=True, return_offsets_mapping=True)
    content = enc["special_tokens_mask"][0] == 0
    pieces = words_by_spaces(TEXTS[0], enc["offset_mapping"][0][content].tolist())[0]
    ids = enc["input_ids"].clone()
    ids[0, content.nonzero().flatten()[pieces]] = tok.pad_token_id
    with torch.no_grad():
        shifted_drop = (model(input_ids=enc["input_ids"]).logits - model(input_ids=ids).logits)[0, 0].item()
    assert abs(got.words[0].attribution - shifted_drop) > 1e-3


def test_occlusion_chunking_and_word_cap():
    model, tok = tiny_classifier("electra")
    one = OcclusionTextExplainer(model, tok, internal_batch_size=1).explain(TEXTS, TARGETS)
    wide = OcclusionTextExplainer(model, tok, internal_batch_size=1000).explain(TEXTS, TARGETS)
    for a, b in zip(one, wide):
        assert_close(values("occlusion", a), values("occlusion", b), rel=1e-5)
    capped = OcclusionTextExplainer(model, tok, max_words=8)
    assert len(capped.explain(TEXTS[1:], [0])[0].words) == 2
    with pytest.raises(TooManyWords):  # serving: 413 too_many_words (tests/serving/test_errors.py)
        capped.explain(TEXTS, TARGETS)  # the first text has 9 words
    with pytest.raises(ValueError):
        OcclusionTextExplainer(model, tok, max_words=0)
    with pytest.raises(ValueError):
        OcclusionTextExplainer(model, tok, internal_batch_size=0)


def test_grad_x_input_vanishes_on_deberta_word_embeddings():
    """Why LAYER["deberta-v2"]: LayerNorm(z) is scale-invariant, so z . dF/dz = 0."""
    model, tok = tiny_classifier("deberta-v2")
    flat = GradXInputTextExplainer(model, tok, layer="deberta.embeddings.word_embeddings").explain(TEXTS, TARGETS)
    useful = GradXInputTextExplainer(model, tok).explain(TEXTS, TARGETS)  # the family's default
    for a, b in zip(flat, useful):
        assert max(abs(t.attribution) for t in a.tokens) < 1e-3 * max(abs(t.attribution) for t in b.tokens)


@pytest.mark.parametrize("method", TEXT_METHODS)
def test_contrast_errors(method):
    options = {"n_steps": 4} if method == "layer_ig" else {}
    explainer = make_text_explainer(method, *tiny_classifier("bert"), **options)
    for contrast, error in (([0], SameClass), ([3], UnknownClass), ([-1], UnknownClass),
                            ([True], UnknownClass), ([1, 2], ValueError)):  # fmt: skip
        with pytest.raises(error) as err:
            explainer.explain(["good"], [0], contrast=contrast)
        if error is UnknownClass:
            assert err.value.field == "contrast"
    assert explainer.explain(["good"], [0], contrast=[None])[0].contrast is None


def test_make_text_explainer():
    model, tok = tiny_classifier("bert")
    options = {"layer": "bert.embeddings", "baseline": "mask", "internal_batch_size": 8, "max_words": 9}
    occlusion = make_text_explainer("occlusion", model, tok, **options)
    assert occlusion.max_words == 9 and occlusion.layer_name == "bert.embeddings"
    assert occlusion.text.baseline_id == tok.mask_token_id
    assert make_text_explainer("layer_ig", model, tok, layer="bert.embeddings", n_steps=4).n_steps == 4
    # an option the method does not take is an error, never dropped silently
    with pytest.raises(ValueError, match="n_steps"):
        make_text_explainer("occlusion", model, tok, n_steps=4)
    with pytest.raises(ValueError, match="max_words"):
        make_text_explainer("layer_ig", model, tok, **options)
    with pytest.raises(ValueError, match="saliency"):
        make_text_explainer("saliency", model, tok)
