"""Tests of tsexplain.attr.text (Layer IG, words) on tiny random HF classifiers (CPU, no downloads)."""

import dataclasses
import json
import math

import pytest
import torch
from captum.attr import LayerIntegratedGradients
from transformers import PreTrainedTokenizerFast

from tiny_hf import (  # noqa: E402
    FAMILIES,
    byte_bpe_tokenizer,
    sentencepiece_tokenizer,
    tiny_classifier,
    wordpiece_tokenizer,
)
from tsexplain.attr.errors import EmptyText, UnknownClass  # noqa: E402
from tsexplain.attr.text.lig import DEFAULT_N_STEPS, LayerIGTextExplainer  # noqa: E402
from tsexplain.attr.text.tokens import WordAttribution, aggregate_words  # noqa: E402

TEXTS = ["the movie was unbelievably good , i loved it", "bad film"]
# The families' default layers (tsexplain.attr.text.families); DeBERTa-v2 without absolute
# positions: see test_deberta_word_embeddings_with_pad_baseline_is_flagged.
LAYER = {"deberta-v2": "deberta.embeddings", "roberta": "roberta.embeddings", "xlm-roberta": "roberta.embeddings"}
EMBEDDINGS = {
    "bert": "bert.embeddings.word_embeddings",
    "distilbert": "distilbert.embeddings.word_embeddings",
    "albert": "albert.embeddings.word_embeddings",
    "roberta": "roberta.embeddings.word_embeddings",
    "deberta-v2": "deberta.embeddings.word_embeddings",
    "electra": "electra.embeddings.word_embeddings",
    "xlm-roberta": "roberta.embeddings.word_embeddings",
}
# combining marks, emoji + skin-tone modifier, CJK, RTL (Hebrew, Arabic)
UNICODE_TEXT = "Cafe\u0301 👍🏽 東京 שלום مرحبا e\u0301\u0301!"


def logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits


def assert_clean(model, mode):
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not module._forward_hooks_with_kwargs and not module._backward_hooks
        assert module.training == mode
    assert all(p.grad is None for p in model.parameters())


def assert_spans(text, explanation):
    for item in explanation.tokens + explanation.words:
        assert 0 <= item.start <= item.end <= len(text)
        assert math.isfinite(item.attribution)
    for word in explanation.words:
        assert word.word == text[word.start : word.end] == word.word.strip() != ""
    starts = [w.start for w in explanation.words]
    assert starts == sorted(starts)


def content_count(tokenizer, text):
    return sum(1 - m for m in tokenizer(text, return_special_tokens_mask=True)["special_tokens_mask"])


# --- parity and completeness -------------------------------------------------------


@pytest.mark.parametrize("baseline", ["pad", "mask"])
def test_matches_direct_captum_call(baseline):
    model, tok = tiny_classifier("bert", 0.35)
    targets = [0, 2]
    # 2 texts x 40 steps > internal_batch_size 64: the explainer integrates in two chunks
    result = LayerIGTextExplainer(model, tok, baseline=baseline, n_steps=40).explain(TEXTS, targets)

    enc = tok(TEXTS, padding=True, return_tensors="pt", return_special_tokens_mask=True)
    content = (enc["special_tokens_mask"] == 0) & (enc["attention_mask"] == 1)
    base_ids = enc["input_ids"].masked_fill(content, getattr(tok, f"{baseline}_token_id"))
    lig = LayerIntegratedGradients(lambda ids, mask: logits(model, ids, mask), model.bert.embeddings.word_embeddings)
    with torch.enable_grad():
        attr = lig.attribute(
            enc["input_ids"], baselines=base_ids, target=targets, additional_forward_args=(enc["attention_mask"],),
            n_steps=40, method="gausslegendre",
        )  # fmt: skip
    expected = attr.sum(-1)
    for i, explanation in enumerate(result):
        want = expected[i][content[i]]
        got = torch.tensor([t.attribution for t in explanation.tokens], dtype=want.dtype)
        assert len(got) == len(want)
        assert torch.allclose(got, want, rtol=0, atol=1e-4 * want.abs().max().item())
        assert want.abs().max() > 1e-3  # a non-trivial model


def test_delta_equals_two_plain_forward_passes():
    model, tok = tiny_classifier("bert", 0.35)
    result = LayerIGTextExplainer(model, tok, n_steps=50).explain(TEXTS, [1, 0])
    enc = tok(TEXTS, padding=True, return_tensors="pt", return_special_tokens_mask=True)
    content = (enc["special_tokens_mask"] == 0) & (enc["attention_mask"] == 1)
    base_ids = enc["input_ids"].masked_fill(content, tok.pad_token_id)
    with torch.no_grad():
        f_x = logits(model, enc["input_ids"], enc["attention_mask"])[:, [1, 0]].diagonal()
        f_b = logits(model, base_ids, enc["attention_mask"])[:, [1, 0]].diagonal()
    for explanation, diff in zip(result, (f_x - f_b).tolist()):
        total = sum(t.attribution for t in explanation.tokens)
        assert abs(diff) > 0.1
        assert abs(total - diff) == pytest.approx(explanation.convergence_delta["absolute"], abs=1e-5)
        assert abs(total - diff) / abs(diff) < 0.01
        assert sum(w.attribution for w in explanation.words) == pytest.approx(total, abs=1e-9)


def test_roberta_delta_uses_the_path_start():
    """RoBERTa derives position ids from the PAD positions of input_ids, so plain
    f(baseline ids) is not where the path starts; F(x') keeps the input's positions
    (on the word embeddings; the family's default layer is test_roberta_default_layer...)."""
    model, tok = tiny_classifier("roberta", 0.35)
    result = LayerIGTextExplainer(model, tok, layer="roberta.embeddings.word_embeddings", n_steps=50).explain(TEXTS, [2, 1])
    enc = tok(TEXTS, padding=True, return_tensors="pt", return_special_tokens_mask=True)
    content = (enc["special_tokens_mask"] == 0) & (enc["attention_mask"] == 1)
    base_ids = enc["input_ids"].masked_fill(content, tok.pad_token_id)
    positions = enc["attention_mask"].cumsum(1) * enc["attention_mask"] + tok.pad_token_id  # RoBERTa's rule
    with torch.no_grad():
        f_x = logits(model, enc["input_ids"], enc["attention_mask"])[:, [2, 1]].diagonal()
        f_b = model(input_ids=base_ids, attention_mask=enc["attention_mask"], position_ids=positions).logits
        f_b = f_b[:, [2, 1]].diagonal()
        f_b_shifted = logits(model, base_ids, enc["attention_mask"])[:, [2, 1]].diagonal()
    for explanation, diff, shifted in zip(result, (f_x - f_b).tolist(), (f_x - f_b_shifted).tolist()):
        total = sum(t.attribution for t in explanation.tokens)
        assert abs(total - diff) == pytest.approx(explanation.convergence_delta["absolute"], abs=1e-5)
        assert explanation.convergence_delta["relative"] < 0.01
        assert abs(total - shifted) > 10 * explanation.convergence_delta["absolute"]


def test_roberta_default_layer_starts_from_padding_and_special_tokens_get_nothing():
    """At the family's default layer (the embeddings' output) the baseline is RoBERTa's own padding:
    the zero PAD row at the padding position. The special tokens keep the input's positions, so they
    are the same in x and x' and the listed tokens' attributions add up to F(x) - F(x')."""
    model, tok = tiny_classifier("roberta", 0.35)
    explainer = LayerIGTextExplainer(model, tok, n_steps=50)
    assert explainer.layer_name == "roberta.embeddings"
    result = explainer.explain(TEXTS, [2, 1])
    enc = tok(TEXTS, padding=True, return_tensors="pt", return_special_tokens_mask=True)
    content = (enc["special_tokens_mask"] == 0) & (enc["attention_mask"] == 1)
    base_ids = enc["input_ids"].masked_fill(content, tok.pad_token_id)
    pad = tok.pad_token_id
    kept = torch.where(base_ids == pad, pad, pad + 1 + torch.arange(base_ids.shape[1]).expand_as(base_ids))
    with torch.no_grad():
        f_x = logits(model, enc["input_ids"], enc["attention_mask"])[:, [2, 1]].diagonal()
        f_b = model(input_ids=base_ids, attention_mask=enc["attention_mask"], position_ids=kept).logits
        f_b = f_b[:, [2, 1]].diagonal()
        f_b_moved = logits(model, base_ids, enc["attention_mask"])[:, [2, 1]].diagonal()  # </s> moved up
    for explanation, diff, moved in zip(result, (f_x - f_b).tolist(), (f_x - f_b_moved).tolist()):
        total = sum(t.attribution for t in explanation.tokens)  # content tokens only
        assert abs(total - diff) == pytest.approx(explanation.convergence_delta["absolute"], abs=1e-5)
        assert explanation.convergence_delta["relative"] < 0.01 and explanation.converged is True
        assert abs(total - moved) > 10 * explanation.convergence_delta["absolute"]


def test_default_n_steps_are_adaptive_and_few_steps_are_flagged():
    model, tok = tiny_classifier("bert", 0.35)
    explainer = LayerIGTextExplainer(model, tok)
    assert explainer.n_steps == DEFAULT_N_STEPS == "auto"
    good = explainer.explain(TEXTS, [0, 1])
    coarse = explainer.explain(TEXTS, [0, 1], n_steps=4)
    bound = explainer.adaptive.max_relative_delta
    assert all(e.converged is True and e.convergence_delta["relative"] <= bound for e in good)
    # a fixed n_steps is judged against the same bound: converged is a bool, never None
    assert all(e.converged is False and e.convergence_delta["relative"] > bound for e in coarse)
    assert [e.n_steps for e in coarse] == [4, 4] and all(e.n_steps >= explainer.adaptive.start for e in good)


# --- model families ------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family(family):
    model, tok = tiny_classifier(family)
    explainer = LayerIGTextExplainer(model, tok, layer=LAYER.get(family))
    assert explainer.layer_name == LAYER.get(family, EMBEDDINGS[family])
    with torch.no_grad():  # the explainer must enable gradients itself
        batch = explainer.explain(TEXTS, [0, 2], top_k=3)
    # padding must not leak: a batch equals each text alone (few steps suffice)
    quick = explainer.explain(TEXTS, [0, 2], n_steps=12)
    singles = [explainer.explain([text], [target], n_steps=12)[0] for text, target in zip(TEXTS, [0, 2])]
    assert_clean(model, mode=False)

    for text, explanation, fast, single in zip(TEXTS, batch, quick, singles):
        assert len(explanation.tokens) == content_count(tok, text)
        assert_spans(text, explanation)
        assert [w.word for w in explanation.words] == text.split()
        assert explanation.convergence_delta["relative"] < 0.05
        assert not explanation.truncated
        assert explanation.top_words == sorted(explanation.words, key=lambda w: -abs(w.attribution))[:3]
        got = torch.tensor([t.attribution for t in fast.tokens])
        alone = torch.tensor([t.attribution for t in single.tokens])
        assert torch.allclose(got, alone, rtol=0, atol=1e-4 * alone.abs().max().item())
        assert [t.token for t in fast.tokens] == [t.token for t in single.tokens]


def test_deberta_word_embeddings_with_pad_baseline_is_flagged():
    """DeBERTa-v3-style embeddings are LayerNorm(word embedding) with no absolute
    positions and a zero PAD row: the path is flat except for a jump at alpha=0, so
    IG cannot converge; the reported delta must say so."""
    model, tok = tiny_classifier("deberta-v2")
    explainer = LayerIGTextExplainer(model, tok, layer="deberta.embeddings.word_embeddings", n_steps=50)
    result = explainer.explain(TEXTS, [0, 2])
    assert min(e.convergence_delta["relative"] for e in result) > 0.1  # vs < 1e-4 for "deberta.embeddings"
    assert not any(e.converged for e in result)
    default = LayerIGTextExplainer(model, tok, n_steps=50)  # the family's default layer
    assert default.layer_name == "deberta.embeddings"
    assert max(e.convergence_delta["relative"] for e in default.explain(TEXTS, [0, 2])) < 1e-3


def test_layer_option_and_errors():
    model, tok = tiny_classifier("bert")
    result = LayerIGTextExplainer(model, tok, layer="bert.embeddings", n_steps=8).explain(TEXTS[:1], [0])[0]
    assert result.layer == "bert.embeddings"
    with pytest.raises(ValueError, match="bert.embeddings.nope"):
        LayerIGTextExplainer(model, tok, layer="bert.embeddings.nope")
    with pytest.raises(ValueError, match="baseline"):
        LayerIGTextExplainer(model, tok, baseline="zeros")
    with pytest.raises(ValueError, match="integration_method"):
        LayerIGTextExplainer(model, tok, integration_method="simpson")
    with pytest.raises(ValueError, match="n_steps"):
        LayerIGTextExplainer(model, tok, n_steps=0)


def test_baseline_tokens_must_exist():
    model, _ = tiny_classifier("bert")
    backend = wordpiece_tokenizer().backend_tokenizer
    no_mask = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    no_pad = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(ValueError, match="mask"):
        LayerIGTextExplainer(model, no_mask, baseline="mask")
    with pytest.raises(ValueError, match="pad"):
        LayerIGTextExplainer(model, no_pad)
    # Without a PAD token the batch is padded with the baseline id (masked out).
    explainer = LayerIGTextExplainer(model, no_pad, baseline="unk", n_steps=8)
    batch = explainer.explain(TEXTS, [0, 1])
    alone = explainer.explain(TEXTS[1:], [1])[0]
    assert [t.attribution for t in batch[1].tokens] == pytest.approx([t.attribution for t in alone.tokens], abs=1e-5)


def test_default_max_length_is_capped_by_position_embeddings():
    # tokenizers built from scratch report a huge model_max_length
    assert LayerIGTextExplainer(*tiny_classifier("bert")).max_length == 64
    # RoBERTa positions start at padding_idx + 1: 66 embeddings, 64 usable
    assert LayerIGTextExplainer(*tiny_classifier("roberta")).max_length == 64


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_truncation_flag(family):
    model, tok = tiny_classifier(family)
    explainer = LayerIGTextExplainer(model, tok, max_length=12, n_steps=8)
    fits, long = " ".join(["the"] * 10), " ".join(["the"] * 11)  # "the" is one piece
    assert content_count(tok, fits) == 10  # + 2 special tokens = max_length
    result = explainer.explain([long, fits, "bad film"], [0, 0, 0])
    assert [e.truncated for e in result] == [True, False, False]
    assert len(result[0].tokens) == 10 and result[0].words[-1].end < len(long)


# --- requests ----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   ", " \n\t\u3000"])
def test_empty_text_is_an_input_error(text):
    explainer = LayerIGTextExplainer(*tiny_classifier("bert"))
    with pytest.raises(EmptyText):  # serving answers it 400 empty_text (tests/serving/test_errors.py)
        explainer.explain(["good", text], [0, 0])


def test_bad_target_is_an_input_error():
    explainer = LayerIGTextExplainer(*tiny_classifier("bert"))
    for targets in ([3], [-1], [True]):
        with pytest.raises(UnknownClass) as err:
            explainer.explain(["good"], targets)
        assert err.value.field == "target"
    with pytest.raises(ValueError):
        explainer.explain(["good", "bad"], [0])


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta"])
def test_unicode_text(family):
    model, tok = tiny_classifier(family)
    explanation = LayerIGTextExplainer(model, tok, n_steps=8).explain([UNICODE_TEXT], [1])[0]
    assert_spans(UNICODE_TEXT, explanation)
    assert not explanation.truncated
    assert "".join(w.word for w in explanation.words) == "".join(UNICODE_TEXT.split())
    assert explanation.words[0].word == "Cafe\u0301"
    json.loads(json.dumps(dataclasses.asdict(explanation)))


def test_model_left_as_found_in_train_mode_and_inference_mode():
    model, tok = tiny_classifier("bert")
    explainer = LayerIGTextExplainer(model, tok, n_steps=8)
    expected = explainer.explain(TEXTS, [0, 1])
    model.train()
    try:
        with torch.inference_mode():
            again = explainer.explain(TEXTS, [0, 1])  # dropout must be off: eval inside
        assert_clean(model, mode=True)
    finally:
        model.eval()
    assert again == expected


# --- word aggregation --------------------------------------------------------------

WORD = "unbelievably"
SENTENCE = f"That was {WORD} good, really"
TOKENIZERS = {  # builder, piece marker, words by the tokenizer's word ids
    "wordpiece": (wordpiece_tokenizer, "##", ["That", "was", WORD, "good", ",", "really"]),
    "byte-bpe": (byte_bpe_tokenizer, "Ġ", ["That", "was", WORD, "good", ",", "really"]),
    "sentencepiece": (lambda: sentencepiece_tokenizer("xlmr"), "▁", ["That", "was", WORD, "good,", "really"]),
}


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_pieces_merge_into_words(kind):
    build, marker, expected = TOKENIZERS[kind]
    tok = build()
    enc = tok(SENTENCE, return_offsets_mapping=True, add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(enc["input_ids"])
    offsets = enc["offset_mapping"]
    values = [0.1 * (i + 1) * (-1) ** i for i in range(len(pieces))]
    assert any(marker in piece for piece in pieces)

    start, end = SENTENCE.index(WORD), SENTENCE.index(WORD) + len(WORD)
    # the word's pieces: inside it, or covering only the space before it ("▁", "Ġ")
    inside = [v for (s, e), v in zip(offsets, values) if s >= start - 1 and e <= end]
    assert len(inside) >= 3  # the word really is split

    by_ids = aggregate_words(SENTENCE, offsets, enc.word_ids(), values)
    by_offsets = aggregate_words(SENTENCE, offsets, None, values)
    assert [w.word for w in by_ids] == expected
    assert [w.word for w in by_offsets] == SENTENCE.split()
    for words in (by_ids, by_offsets):
        (merged,) = [w for w in words if w.word == WORD]
        assert (merged.start, merged.end) == (start, end)
        assert merged.attribution == pytest.approx(sum(inside))
        assert sum(w.attribution for w in words) == pytest.approx(sum(values))


def test_lone_metaspace_piece_is_carried_to_the_next_word():
    text = "a  b"  # SentencePiece: "▁a", "▁" (the second space), "▁b"
    words = aggregate_words(text, [(0, 1), (2, 3), (3, 4)], [0, 1, 2], [1.0, 2.0, 4.0])
    assert words == [WordAttribution("a", 0, 1, 1.0), WordAttribution("b", 3, 4, 6.0)]
    # leading-space spans (byte BPE without trim_offsets) and an empty trailing piece
    words = aggregate_words(" ab c", [(0, 2), (2, 3), (3, 5), (5, 5)], None, [1.0, 2.0, 4.0, 8.0])
    assert words == [WordAttribution("ab", 1, 3, 3.0), WordAttribution("c", 4, 5, 12.0)]
    with pytest.raises(ValueError):
        aggregate_words("ab", [(0, 2)], None, [1.0, 2.0])


def test_sentencepiece_whitespace_runs():
    tok = sentencepiece_tokenizer("xlmr")
    text = "  bad   film  "
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    pieces = tok.convert_ids_to_tokens(enc["input_ids"])
    assert "▁" in pieces
    values = [float(i + 1) for i in range(len(pieces))]
    words = aggregate_words(text, enc["offset_mapping"], enc.word_ids(), values)
    assert [(w.word, w.start, w.end) for w in words] == [("bad", 2, 5), ("film", 8, 12)]
    assert sum(w.attribution for w in words) == pytest.approx(sum(values))
