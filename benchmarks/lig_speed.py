"""In-process LIG speed: each speed-up on and off, beside the prediction it explains.

Model: BERT-base shape with random weights (``transformers.BertConfig`` defaults: 12 layers,
hidden 768) and a WordPiece tokenizer trained here on synthetic reviews (demo/train_reviews.py),
nothing downloaded. Inputs: batch 1 = one text of ``--tokens`` tokens; batch 8 = texts from a
quarter of ``--tokens`` up to ``--tokens`` (the longest has exactly ``--tokens``), so padding
matters. Each variant runs ``--repeats`` times (fewer when ``--time-budget`` runs out; variants
that did not start in time are listed as skipped). Times are wall-clock, CUDA synchronised.

Variants: ``predict`` (tokenize + forward, inference mode, fp32, as the handler does);
``captum_ref`` (captum LayerIntegratedGradients, n_steps 50, fp32, padded to ``--tokens``, all
path points in one pass); ``ours_*`` (LayerIGTextExplainer) with one means changed at a time
from ``ours_base`` (fp32, n_steps 50, internal_batch_size 64, padding trimmed), ``ours_adaptive`` (the
default adaptive n_steps) and ``ours_all`` (precision auto, internal_batch_size auto, adaptive n_steps). Also the relative convergence
delta of every explained text (p50, p95, max, share <= 0.05) and the mean n_steps used.

Usage: python benchmarks/lig_speed.py [--device auto|cpu|cuda] [--layers 12] [--tokens 128]
       [--repeats 5] [--time-budget 600] [--out build/bench/lig_speed]
Writes ``<out>.json`` and ``<out>.md``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from captum.attr import LayerIntegratedGradients  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from demo.train_reviews import train_tokenizer  # noqa: E402
from tsexplain.tools.synthetic import reviews  # noqa: E402
from tsexplain.attr.text.lig import AdaptiveSteps, LayerIGTextExplainer  # noqa: E402

BOUND = 0.05


def build(layers: int, device: torch.device, max_tokens: int):
    texts = [s.text for s in reviews.generate(2000, seed=1)]
    tokenizer = train_tokenizer(texts, {"vocab_size": 4000, "max_length": 512})
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), num_hidden_layers=layers, num_labels=3,
                        pad_token_id=tokenizer.pad_token_id)
    model = BertForSequenceClassification(config).to(device).eval()
    return model, tokenizer, texts


def text_of(tokenizer, words: list[str], tokens: int) -> str:
    """The shortest prefix of ``words`` that encodes to ``tokens`` tokens or more, cut back to ``tokens``."""
    low, high = 1, len(words)
    while low < high:
        mid = (low + high) // 2
        if len(tokenizer(" ".join(words[:mid]))["input_ids"]) >= tokens:
            high = mid
        else:
            low = mid + 1
    ids = tokenizer(" ".join(words[:low]), truncation=True, max_length=tokens)["input_ids"]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert len(tokenizer(text)["input_ids"]) <= tokens
    return text


def inputs(tokenizer, corpus: list[str], tokens: int):
    words = " ".join(corpus).split()
    single = [text_of(tokenizer, words, tokens)]
    lengths = [tokens - k * (tokens - tokens // 4) // 7 for k in range(8)]
    batch = [text_of(tokenizer, words[i * 400:], n) for i, n in enumerate(lengths)]
    return single, batch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    began = time.perf_counter()
    out = fn()
    sync(device)
    return (time.perf_counter() - began) * 1000, out


def predict(model, tokenizer, texts, device, max_length):
    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**{k: v.to(device) for k, v in encoded.items()}).logits
    return F.softmax(logits.float(), dim=1).argmax(1).tolist()


def captum_reference(model, tokenizer, texts, targets, device, max_length):
    """The plain recipe: pad to max_length, one captum call, fp32, n_steps 50; delta as captum reports it."""
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length",
                    return_tensors="pt", return_special_tokens_mask=True)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    content = ((enc["special_tokens_mask"] == 0) & (enc["attention_mask"] == 1)).to(device)
    baseline = ids.masked_fill(content, tokenizer.pad_token_id)
    lig = LayerIntegratedGradients(lambda i, m: model(input_ids=i, attention_mask=m).logits,
                                   model.get_input_embeddings())
    with torch.enable_grad():
        attr, delta = lig.attribute(ids, baselines=baseline, target=targets, additional_forward_args=(mask,),
                                    n_steps=50, method="gausslegendre", return_convergence_delta=True)
    with torch.no_grad():
        f = model(input_ids=ids, attention_mask=mask).logits.double()
        f0 = model(input_ids=baseline, attention_mask=mask).logits.double()
    index = torch.tensor(targets, device=device).unsqueeze(1)
    diff = (f.gather(1, index) - f0.gather(1, index)).squeeze(1).abs().clamp_min(1e-12)
    return (delta.double().abs() / diff).tolist(), [50] * len(texts)


class PaddedToMax(LayerIGTextExplainer):
    """Ours with the trimming turned off: every pass padded to ``max_length``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        text, trimmed = self.text, self.text.tensors

        def padded(encoded, rows):
            ids, attention_mask, token_type_ids, content = trimmed(encoded, rows)
            extra = self.max_length - ids.shape[1]
            ids = F.pad(ids, (0, extra), value=text.tokenizer.pad_token_id)
            attention_mask = F.pad(attention_mask, (0, extra), value=0)
            if token_type_ids is not None:
                token_type_ids = F.pad(token_type_ids, (0, extra), value=text.tokenizer.pad_token_type_id)
            return ids, attention_mask, token_type_ids, F.pad(content, (0, extra), value=False)

        text.tensors = padded


VARIANTS = {  # in order of interest: a tight --time-budget skips the last ones; n_steps 50 unless "auto"
    "ours_base": {},
    "ours_no_trim": {"cls": PaddedToMax},
    "ours_adaptive": {"n_steps": "auto"},  # the default since issue #15
    "ours_all": {"precision": "auto", "internal_batch_size": "auto", "n_steps": "auto"},
    "ours_ibs_auto": {"internal_batch_size": "auto"},
    "ours_ibs_none": {"internal_batch_size": None},
    "ours_bf16": {"precision": "bf16"},
}


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--layers", type=int, default=12, help="BERT layers (12: BERT-base)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-budget-mb", type=float, default=1024)
    parser.add_argument("--time-budget", type=float, default=600, help="seconds; later variants are skipped")
    parser.add_argument("--out", default=str(ROOT / "build" / "bench" / "lig_speed"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    started = time.perf_counter()
    model, tokenizer, corpus = build(args.layers, device, args.tokens)
    single, batch = inputs(tokenizer, corpus, args.tokens)
    schedule = AdaptiveSteps(max_relative_delta=BOUND)  # the default schedule
    explainers = {}
    for name, options in VARIANTS.items():
        options = {"n_steps": 50, **options}
        cls = options.pop("cls", LayerIGTextExplainer)
        explainers[name] = cls(model, tokenizer, max_length=args.tokens, adaptive=schedule,
                               memory_budget_mb=args.memory_budget_mb, **options)
    setup_s = time.perf_counter() - started
    cost = explainers["ours_ibs_auto"].activation_cost

    rows = []
    for batch_name, texts in (("1", single), ("8", batch)):
        # warm-up (first-call allocations, kernel selection), not timed
        targets = predict(model, tokenizer, texts, device, args.tokens)
        explainers["ours_base"].explain(texts, targets, n_steps=2)
        runs = [("predict", lambda: (predict(model, tokenizer, texts, device, args.tokens), None)),
                ("captum_ref", lambda: captum_reference(model, tokenizer, texts, targets, device, args.tokens))]
        for name, explainer in explainers.items():
            def run(explainer=explainer):
                results = explainer.explain(texts, targets)
                return [r.convergence_delta["relative"] for r in results], [r.n_steps for r in results]
            runs.append((name, run))
        for name, fn in runs:
            times, deltas, steps = [], [], []
            for _ in range(args.repeats):
                if time.perf_counter() - started > args.time_budget:
                    break
                ms, out = timed(fn, device)
                times.append(ms)
                if out[1] is not None:
                    deltas += out[0]
                    steps += out[1]
            row = {"batch": int(batch_name), "variant": name, "runs": len(times)}
            if times:
                row["p50_ms"] = statistics.median(times)
                if deltas:
                    row.update(delta_p50=percentile(deltas, 0.5), delta_p95=percentile(deltas, 0.95),
                               delta_max=max(deltas), share_within_bound=sum(d <= BOUND for d in deltas) / len(deltas),
                               mean_n_steps=statistics.mean(steps))
            rows.append(row)
            print(json.dumps(row), flush=True)
    for row in rows:
        predict_row = next(r for r in rows if r["batch"] == row["batch"] and r["variant"] == "predict")
        if "p50_ms" in row and "p50_ms" in predict_row:
            row["x_predict"] = row["p50_ms"] / predict_row["p50_ms"]

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "layers": args.layers, "tokens": args.tokens, "repeats": args.repeats,
        "batch8_token_lengths": [len(tokenizer(t)["input_ids"]) for t in batch],
        "precision_auto": explainers["ours_all"].precision,
        "activation_cost": vars(cost) if cost else None,
        "ibs_auto_rows_at_tokens": cost.rows_within(args.memory_budget_mb * 2**20, args.tokens) if cost else None,
        "setup_s": setup_s, "total_s": time.perf_counter() - started,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def markdown(report) -> str:
    head = (f"LIG speed, BERT ({report['layers']} layers, random weights) at {report['tokens']} tokens on "
            f"{report['device']} ({report['cpu_threads']} CPU threads), torch {report['torch']}; "
            f"batch 8 token lengths {report['batch8_token_lengths']}; precision auto = {report['precision_auto']}; "
            f"ibs auto = {report['ibs_auto_rows_at_tokens']} rows at {report['tokens']} tokens.\n\n")
    lines = ["| batch | variant | runs | p50 ms | × predict p50 | rel. delta p50 | p95 | max | ≤ 0.05 | mean n_steps |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    for r in report["rows"]:
        if "p50_ms" not in r:
            lines.append(f"| {r['batch']} | {r['variant']} | 0 | skipped (time budget) | | | | | | |")
            continue
        lines.append(
            f"| {r['batch']} | {r['variant']} | {r['runs']} | {r['p50_ms']:.1f} | {fmt(r.get('x_predict'), '.1f')} | "
            f"{fmt(r.get('delta_p50'), '.2e')} | {fmt(r.get('delta_p95'), '.2e')} | {fmt(r.get('delta_max'), '.2e')} | "
            f"{fmt(r.get('share_within_bound'), '.0%')} | {fmt(r.get('mean_n_steps'), '.1f')} |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
