"""Train the tiny BERT review-sentiment demo model, offline and deterministically.

Usage (from the repository root)::

    python -m demo.train_reviews --out build/demo/reviews [--force]

Writes into ``--out`` a WordPiece tokenizer and a ``BertForSequenceClassification``
(both loadable with ``AutoTokenizer`` / ``AutoModelForSequenceClassification``)
and ``training.json`` with sizes, held-out accuracy and the cue-word hit@3 of
Layer Integrated Gradients explanations.  Reruns with an unchanged fingerprint
(hyper-parameters + source of this script and of the data generator) are skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import random
import string
import time
from pathlib import Path

import torch
import transformers
from captum.attr import LayerIntegratedGradients
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import WordPiece
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from tsexplain.tools.synthetic import reviews
from tsexplain.tools.synthetic.reviews import (
    LABELS, ReviewSample, flip_negation, generate, generate_neutral)

HPARAMS = {
    "seed": 0,
    "n_reviews": 6000,
    "n_neutral": 2000,
    "n_heldout": 2000,
    "n_attribution": 300,
    "vocab_size": 1000,
    "max_length": 64,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "dropout": 0.0,
    "epochs": 10,
    "batch_size": 64,
    "lr": 2e-3,
    "weight_decay": 0.01,
    "warmup_fraction": 0.1,
}
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def fingerprint(hp: dict) -> str:
    """Hash of the hyper-parameters and the source of this script and the generator."""
    text = json.dumps(hp, sort_keys=True) + Path(__file__).read_text() + inspect.getsource(reviews)
    return hashlib.sha256(text.encode()).hexdigest()


def _bert_pipeline(model: WordPiece) -> Tokenizer:
    """``model`` with BERT's lowercasing normalizer, pre-tokenizer and decoder."""
    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def train_tokenizer(texts: list[str], hp: dict) -> BertTokenizerFast:
    """Train a WordPiece tokenizer on ``texts`` and wrap it for transformers.

    Every letter and digit is seeded as a ``##`` continuation piece, so unseen
    words split into pieces instead of becoming [UNK].  Seeding them (as
    special tokens, for training only) also makes the trainer deterministic:
    it otherwise numbers continuation pieces in hash order and breaks merge
    ties differently from run to run (huggingface/tokenizers#1794).
    """
    alphabet = string.ascii_lowercase + string.digits
    seeds = ["##" + c for c in alphabet]
    trainer = trainers.WordPieceTrainer(
        vocab_size=hp["vocab_size"], special_tokens=[*SPECIAL_TOKENS, *seeds],
        initial_alphabet=list(alphabet + string.punctuation), continuing_subword_prefix="##",
        show_progress=False)
    trained = _bert_pipeline(WordPiece(unk_token="[UNK]"))
    trained.train_from_iterator(texts, trainer)
    tok = _bert_pipeline(WordPiece(trained.get_vocab(), unk_token="[UNK]"))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    return BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=hp["max_length"])


def build_model(tokenizer: BertTokenizerFast, hp: dict) -> BertForSequenceClassification:
    """A tiny randomly initialised BERT classifier over LABELS."""
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hp["hidden_size"],
        num_hidden_layers=hp["num_hidden_layers"], num_attention_heads=hp["num_attention_heads"],
        intermediate_size=hp["intermediate_size"], max_position_embeddings=hp["max_length"],
        hidden_dropout_prob=hp["dropout"], attention_probs_dropout_prob=hp["dropout"],
        pad_token_id=tokenizer.pad_token_id, num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)})
    return BertForSequenceClassification(config)


def encode(tokenizer: BertTokenizerFast, texts: list[str]):
    """Tokenize ``texts`` padded to the longest one."""
    return tokenizer(texts, padding=True, truncation=True, return_tensors="pt")


def train(model, tokenizer, texts: list[str], targets: torch.Tensor, hp: dict) -> None:
    """Train ``model`` on ``texts`` against per-text class probabilities ``targets``.

    AdamW with a linear warmup/decay schedule and soft-target cross-entropy.
    """
    enc = encode(tokenizer, texts)
    gen = torch.Generator().manual_seed(hp["seed"])
    steps = hp["epochs"] * -(-len(texts) // hp["batch_size"])
    warmup = int(hp["warmup_fraction"] * steps)
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / (steps - warmup))))
    model.train()
    for epoch in range(hp["epochs"]):
        total = 0.0
        for idx in torch.randperm(len(texts), generator=gen).split(hp["batch_size"]):
            mask = enc["attention_mask"][idx]
            width = int(mask.sum(1).max())
            ids, mask = enc["input_ids"][idx, :width], mask[:, :width]
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = torch.nn.functional.cross_entropy(logits, targets[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{hp['epochs']}: train loss {total / len(texts):.4f}", flush=True)


@torch.no_grad()
def evaluate(model, tokenizer, samples: list[ReviewSample]) -> tuple[float, float]:
    """Return (accuracy, accuracy on negated samples)."""
    model.eval()
    enc = encode(tokenizer, [s.text for s in samples])
    pred = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.argmax(-1)
    correct = [int(p) == s.label for p, s in zip(pred, samples)]
    negated = [c for c, s in zip(correct, samples) if s.negated]
    return sum(correct) / len(correct), sum(negated) / len(negated)


def cue_hit_at_3(model, tokenizer, samples: list[ReviewSample], batch: int = 25) -> float:
    """Fraction of samples whose sentiment cue word is in the top-3 words by |LIG attribution|.

    Attributions are taken on the word embeddings for the predicted class's
    softmax probability, against a baseline with every non-special token
    replaced by [PAD]; token scores (summed over the hidden dim) are summed
    per word via ``word_ids()``.
    """
    model.eval()

    def forward(input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits.softmax(-1)

    lig = LayerIntegratedGradients(forward, model.get_input_embeddings())
    special = torch.tensor(tokenizer.all_special_ids)
    hits = 0
    for i in range(0, len(samples), batch):
        chunk = samples[i:i + batch]
        enc = encode(tokenizer, [s.text for s in chunk])
        ids, mask = enc["input_ids"], enc["attention_mask"]
        baseline = torch.where(torch.isin(ids, special), ids, tokenizer.pad_token_id)
        with torch.no_grad():
            target = forward(ids, mask).argmax(-1)
        attr = lig.attribute(ids, baselines=baseline, target=target,
                             additional_forward_args=(mask,), n_steps=50,
                             method="gausslegendre").sum(-1)
        for j, s in enumerate(chunk):
            scores: dict[int, float] = {}
            for t, w in enumerate(enc.word_ids(j)):
                if w is not None:
                    scores[w] = scores.get(w, 0.0) + float(attr[j, t])
            top = sorted(scores, key=lambda w: -abs(scores[w]))[:3]
            hits += enc.char_to_word(j, s.sentiment_span[0]) in top
    return hits / len(samples)


def blank_words(text: str, rng: random.Random) -> str:
    """Replace each word of ``text`` by [PAD] at a rate drawn uniformly per text."""
    rate = rng.random()
    return " ".join("[PAD]" if rng.random() < rate else w for w in text.split())


def build_data(hp: dict) -> tuple[list[ReviewSample], list[str], list[ReviewSample]]:
    """Labelled training reviews, neutral training texts and held-out reviews.

    Labelled: ``n_reviews`` reviews plus every negated one without its negator
    (minimal pairs).  Neutral: ``n_neutral`` cue-free reviews with some words
    blanked to [PAD], down to the all-[PAD] attribution baseline; trained
    towards a uniform target so the baseline is neutral.  Held-out reviews
    come from another seed and never repeat a training text.
    """
    rng = random.Random(hp["seed"])
    base = generate(hp["n_reviews"], hp["seed"])
    labelled = base + [flip_negation(s, rng) for s in base if s.negated]
    neutral = [blank_words(t, rng) for t in generate_neutral(hp["n_neutral"], hp["seed"] + 2)]
    seen = {s.text for s in labelled}
    heldout = [s for s in generate(2 * hp["n_heldout"], hp["seed"] + 1) if s.text not in seen]
    return labelled, neutral, heldout[:hp["n_heldout"]]


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--force", action="store_true", help="retrain even if cached")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    hp, fp = HPARAMS, fingerprint(HPARAMS)
    info_path = args.out / "training.json"
    cached = info_path.exists() and json.loads(info_path.read_text()).get("fingerprint") == fp
    if cached and not args.force:
        print(f"cached: {args.out}")
        return

    torch.manual_seed(hp["seed"])
    torch.set_num_threads(1)  # 2 threads ran 3-10x slower per step on the shared 2-core CPU
    torch.use_deterministic_algorithms(True)

    labelled, neutral, heldout = build_data(hp)
    texts = [s.text for s in labelled] + neutral
    targets = torch.cat([torch.eye(len(LABELS))[[s.label for s in labelled]],
                         torch.full((len(neutral), len(LABELS)), 1 / len(LABELS))])
    print(f"data: {len(labelled)} labelled + {len(neutral)} neutral training texts, "
          f"{len(heldout)} held-out", flush=True)
    tokenizer = train_tokenizer([s.text for s in labelled], hp)
    model = build_model(tokenizer, hp)
    print(f"tokenizer: {len(tokenizer)} tokens; model: {model.num_parameters()} parameters",
          flush=True)
    train(model, tokenizer, texts, targets, hp)

    accuracy, negated_accuracy = evaluate(model, tokenizer, heldout)
    print(f"held-out accuracy {accuracy:.4f} (negated {negated_accuracy:.4f})", flush=True)
    hit3 = cue_hit_at_3(model, tokenizer, heldout[:hp["n_attribution"]])
    print(f"cue hit@3 {hit3:.4f} on {hp['n_attribution']} held-out samples", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(args.out)
    model.save_pretrained(args.out)
    cfg = model.config
    info = {
        "fingerprint": fp, "hparams": hp,
        "config": {k: getattr(cfg, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                  "num_attention_heads", "intermediate_size",
                                                  "max_position_embeddings")},
        "num_parameters": model.num_parameters(), "seed": hp["seed"],
        "n_train": len(texts), "n_labelled": len(labelled), "n_neutral": len(neutral),
        "n_heldout": len(heldout), "n_heldout_negated": sum(s.negated for s in heldout),
        "n_attribution": hp["n_attribution"],
        "epochs": hp["epochs"], "heldout_accuracy": accuracy, "negated_accuracy": negated_accuracy,
        "cue_hit_at_3": hit3, "train_seconds": round(time.perf_counter() - start, 1),
        "torch_version": torch.__version__, "transformers_version": transformers.__version__,
    }
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    print(f"saved to {args.out} in {info['train_seconds']} s", flush=True)


if __name__ == "__main__":
    main()
