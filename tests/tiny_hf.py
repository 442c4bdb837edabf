"""Tiny random Hugging Face classifiers and locally trained tokenizers for tests.

Nothing is downloaded: tokenizers are trained with the ``tokenizers`` library on
the small corpus below (vocabularies small enough that longer words split into
several pieces) and models are built from configs with random weights.
"""

import json
import threading
from functools import lru_cache

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AlbertConfig,
    AlbertForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForSequenceClassification,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)
from transformers.initialization import TORCH_INIT_FUNCTIONS

_GENUINE_INIT_WEIGHTS = PreTrainedModel.init_weights  # as imported, before any load could patch it

CORPUS = [
    "the movie was good and the plot was believable",
    "the acting was bad and the story was not believable",
    "a great film with a happy ending and good music",
    "i did not like the boring parts of the film",
    "the best movie of the year with a great cast",
    "a bad script and a worse ending",
] * 4

BERT_SPECIALS = {
    "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]",
}  # fmt: skip
ROBERTA_SPECIALS = {
    "bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
    "cls_token": "<s>", "sep_token": "</s>", "mask_token": "<mask>",
}  # fmt: skip
# Training puts special tokens first, so "<s>"=0, "<pad>"=1, "</s>"=2 as in RoBERTa.
ROBERTA_ORDER = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
BERT_ORDER = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _canonical(tok: Tokenizer, specials: list[str]) -> Tokenizer:
    """Re-number a trained vocabulary deterministically.

    WordPiece and Unigram trainers order tied pieces by hash order, which changes
    from run to run (and with it token ids and the random model they feed).
    """
    data = json.loads(tok.to_str())
    model = data["model"]
    if model["type"] == "WordPiece":
        rest = sorted(set(model["vocab"]) - set(specials))
        model["vocab"] = {piece: i for i, piece in enumerate(specials + rest)}
    else:  # Unigram: [piece, log-probability] pairs
        scores = {piece: round(score, 4) for piece, score in model["vocab"] if piece not in specials}
        rest = sorted(scores, key=lambda piece: (-scores[piece], piece))
        model["vocab"] = [[piece, 0.0] for piece in specials] + [[piece, scores[piece]] for piece in rest]
        model["unk_id"] = specials.index(data["added_tokens"][model["unk_id"]]["content"])
    assert [t["content"] for t in data["added_tokens"]] == specials
    return Tokenizer.from_str(json.dumps(data))


def _wrap(tok: Tokenizer, specials: dict, cls: str, sep: str) -> PreTrainedTokenizerFast:
    if tok.post_processor is None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))],
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


@lru_cache(maxsize=None)
def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """BERT-style: lowercasing normalizer, ``##`` continuation pieces."""
    def pipeline(model):
        tok = Tokenizer(model)
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        return tok

    # Every letter seeded as a ``##`` piece (as a special token, for training only) makes the
    # trainer deterministic; it otherwise breaks merge ties in hash order, so the pieces (not
    # only their ids) changed from process to process (huggingface/tokenizers#1794), and with
    # them what the tiny models computed. The same as demo/train_reviews.py.
    letters = "abcdefghijklmnopqrstuvwxyz"
    trainer = trainers.WordPieceTrainer(vocab_size=80, special_tokens=BERT_ORDER + ["##" + c for c in letters],
                                        initial_alphabet=list(letters), continuing_subword_prefix="##",
                                        show_progress=False)
    trained = pipeline(models.WordPiece(unk_token="[UNK]"))
    trained.train_from_iterator(CORPUS, trainer)
    tok = pipeline(models.WordPiece(trained.get_vocab(), unk_token="[UNK]"))
    tok.add_special_tokens(BERT_ORDER)
    return _wrap(_canonical(tok, BERT_ORDER), BERT_SPECIALS, "[CLS]", "[SEP]")


@lru_cache(maxsize=None)
def byte_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """RoBERTa-style byte-level BPE: ``Ġ`` marks a leading space, prefix space added."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=ROBERTA_ORDER,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True)
    return _wrap(tok, ROBERTA_SPECIALS, "<s>", "</s>")


@lru_cache(maxsize=None)
def sentencepiece_tokenizer(style: str = "xlmr") -> PreTrainedTokenizerFast:
    """SentencePiece-style Unigram with a ``Metaspace`` (``▁``) pre-tokenizer.

    ``style="xlmr"``: ``<s> $A </s>`` (XLM-RoBERTa); ``"deberta"``: ``[CLS] $A [SEP]``
    (DeBERTa-v2/v3, ALBERT).
    """
    if style == "xlmr":
        order, specials, cls, sep = ROBERTA_ORDER, ROBERTA_SPECIALS, "<s>", "</s>"
    else:
        order, specials, cls, sep = BERT_ORDER, BERT_SPECIALS, "[CLS]", "[SEP]"
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    unk = specials["unk_token"]
    trainer = trainers.UnigramTrainer(vocab_size=60, special_tokens=order, unk_token=unk, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return _wrap(_canonical(tok, order), specials, cls, sep)


SMALL = {"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 32, "intermediate_size": 64}


def _common(tok, init):
    return {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "initializer_range": init, "num_labels": 3}


def _bert(tok, init):
    return BertForSequenceClassification(BertConfig(max_position_embeddings=64, **SMALL, **_common(tok, init)))


def _distilbert(tok, init):
    sizes = {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64}
    config = DistilBertConfig(max_position_embeddings=64, **sizes, **_common(tok, init))
    return DistilBertForSequenceClassification(config)


def _roberta(tok, init, config_cls=RobertaConfig, model_cls=RobertaForSequenceClassification):
    # RoBERTa positions start at pad_token_id + 1: 66 embeddings give 64 usable positions
    config = config_cls(
        max_position_embeddings=66, type_vocab_size=1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        **SMALL, **_common(tok, init),
    )  # fmt: skip
    return model_cls(config)


def _xlmr(tok, init):
    return _roberta(tok, init, XLMRobertaConfig, XLMRobertaForSequenceClassification)


def _deberta_v2(tok, init):
    # DeBERTa-v3 style: relative attention only, no absolute positions, no token types
    config = DebertaV2Config(
        max_position_embeddings=64, type_vocab_size=0, relative_attention=True, position_buckets=16,
        pos_att_type=["p2c", "c2p"], position_biased_input=False, norm_rel_ebd="layer_norm", share_att_key=True,
        **SMALL, **_common(tok, init),
    )  # fmt: skip
    return DebertaV2ForSequenceClassification(config)


def _albert(tok, init):
    # factorised embeddings (16 -> 32) and one layer group shared by both layers, as in ALBERT
    config = AlbertConfig(embedding_size=16, max_position_embeddings=64, **SMALL, **_common(tok, init))
    return AlbertForSequenceClassification(config)


def _electra(tok, init):
    config = ElectraConfig(embedding_size=16, max_position_embeddings=64, **SMALL, **_common(tok, init))
    return ElectraForSequenceClassification(config)


FAMILIES = {
    "bert": (_bert, wordpiece_tokenizer),
    "distilbert": (_distilbert, wordpiece_tokenizer),
    "roberta": (_roberta, byte_bpe_tokenizer),
    "albert": (_albert, lambda: sentencepiece_tokenizer("deberta")),
    "deberta-v2": (_deberta_v2, lambda: sentencepiece_tokenizer("deberta")),
    "electra": (_electra, wordpiece_tokenizer),
    "xlm-roberta": (_xlmr, lambda: sentencepiece_tokenizer("xlmr")),
}


# Weight std per family (HF's 0.02 gives near-constant logits; larger values make the
# logits move along the integration path). DistilBERT's ReLU head makes its path
# piecewise smooth, which Gauss-Legendre handles worse: keep its kinks fewer.
INIT = {"distilbert": 0.15}


@lru_cache(maxsize=None)
def _check_init_functions(when: str) -> None:
    """Fail loudly if transformers' ``no_init_weights`` has left weight initialisation off.

    It swaps ``torch.nn.init``'s functions and ``PreTrainedModel.init_weights`` for no-ops,
    process-wide, while a ``from_pretrained`` runs, and restores what it saved; two loads in
    two threads at once can restore the no-ops for good. A model built meanwhile would keep
    uninitialised weights. (A guard only: the flaky tiny-model tests once blamed on this came
    from the tokenizer vocabulary, see ``wordpiece_tokenizer``.)"""
    patched = [name for name, genuine in TORCH_INIT_FUNCTIONS.items() if getattr(torch.nn.init, name) is not genuine]
    if PreTrainedModel.init_weights is not _GENUINE_INIT_WEIGHTS:
        patched.append("PreTrainedModel.init_weights")
    if patched:
        threads = ", ".join(sorted(t.name for t in threading.enumerate()))
        raise RuntimeError(f"{when}: weight initialisation is switched off ({', '.join(patched)}), as transformers' "
                           f"no_init_weights leaves it when from_pretrained runs in another thread; threads: {threads}")


def tiny_classifier(family: str, init: float | None = None):
    """``(model, tokenizer)``: a 3-label random classifier in eval mode (seeded)."""
    build_model, build_tokenizer = FAMILIES[family]
    tokenizer = build_tokenizer()
    _check_init_functions(f"before building the tiny {family} model")
    torch.manual_seed(0)
    model = build_model(tokenizer, INIT.get(family, 0.2) if init is None else init).eval()
    _check_init_functions(f"while building the tiny {family} model")
    return model, tokenizer
