"""Layer IG convergence by family: the share of texts within the relative-delta bound, steps and time,
before (50 fixed steps on the input embeddings from PAD) and with today's defaults, in the same run.

Models: one small classifier per family trained briefly on the synthetic reviews
(``tests/trained_hf.py``, cached under ``build/families``), explained on held-out reviews; the demo
``reviews`` model (``build/demo/reviews``) on the CPU benchmark's 64-token texts
(``benchmarks/models.py``); and ``modernbert-zero-pad``, the trained ModernBERT with its never-used PAD
embedding row set to zero (its predictions are unchanged: padding is masked out), which is how a
PAD baseline fails on it.

Configurations, each on the same texts, targets = predicted classes, in batches of ``--batch``
(interleaved batch by batch, so that the shared machine's load falls on all alike):

- ``before``: the input embeddings, PAD baseline, 50 Gauss-Legendre steps (the defaults until now);
- ``family_50``: the family's default layer and baseline (``tsexplain.attr.text.families``), 50 steps;
- ``before_auto``: the old layer and baseline with the adaptive schedule;
- ``default``: what ``LayerIGTextExplainer`` does by default (the family's layer and baseline, adaptive);
- ``reference`` (``--reference-steps``, default 512): the default's layer and baseline at many fixed
  steps; the default's attributions are compared with it (top word the same; L1 error / L1 norm).

Usage: python benchmarks/lig_convergence.py [--models all|bert,roberta,...] [--texts 100] [--batch 8]
       [--out build/bench/lig_convergence]
Writes ``<out>.json`` and ``<out>.md``. CPU timings depend on the machine's load: compare the ratios.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from tsexplain.attr.text.adaptive import AdaptiveSteps  # noqa: E402
from tsexplain.attr.text.lig import LayerIGTextExplainer  # noqa: E402

BOUND = 0.05


def load(name: str):
    """``(model, tokenizer, texts-maker)`` for a benchmark model name."""
    import trained_hf

    if name == "reviews":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from benchmarks.models import text_inputs

        demo = ROOT / "build" / "demo" / "reviews"
        tok = AutoTokenizer.from_pretrained(demo, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(demo, local_files_only=True).eval()
        return model, tok, lambda n: text_inputs(n, tok, 64)
    family = name.removesuffix("-zero-pad")
    model, tok = trained_hf.trained_classifier(family)
    if name.endswith("-zero-pad"):
        with torch.no_grad():
            model.get_input_embeddings().weight[tok.pad_token_id].zero_()
    return model, tok, lambda n: [s.text for s in trained_hf.heldout(n)]


def configs(model, tok, reference_steps: int, schedule: AdaptiveSteps) -> dict:
    input_layer = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    old = {"layer": input_layer, "baseline": "pad"}
    return {
        "before": LayerIGTextExplainer(model, tok, n_steps=50, **old),
        "family_50": LayerIGTextExplainer(model, tok, n_steps=50),
        "before_auto": LayerIGTextExplainer(model, tok, adaptive=schedule, **old),
        "default": LayerIGTextExplainer(model, tok, adaptive=schedule),
    } | ({"reference": LayerIGTextExplainer(model, tok, n_steps=reference_steps)} if reference_steps else {})


def predicted(model, tok, texts: list[str]) -> list[int]:
    enc = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.argmax(-1).tolist()


def percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def agreement(result, reference) -> tuple[bool, float]:
    """(same top word, L1 distance of the word attributions / L1 norm of the reference's)."""
    ours = [w.attribution for w in result.words]
    ref = [w.attribution for w in reference.words]
    norm = sum(abs(r) for r in ref) or 1.0
    top = (max(range(len(ours)), key=lambda i: abs(ours[i])) == max(range(len(ref)), key=lambda i: abs(ref[i])))
    return top, sum(abs(a - b) for a, b in zip(ours, ref)) / norm


def measure(name: str, n_texts: int, batch: int, reference_steps: int, schedule: AdaptiveSteps) -> dict:
    model, tok, make_texts = load(name)
    texts = make_texts(n_texts)
    targets = predicted(model, tok, texts)
    explainers = configs(model, tok, reference_steps, schedule)
    results = {k: [] for k in explainers}
    seconds = {k: 0.0 for k in explainers}
    explainers["before"].explain(texts[:1], targets[:1])  # warm-up, not timed
    for i in range(0, len(texts), batch):
        for key, explainer in explainers.items():
            began = time.perf_counter()
            results[key] += explainer.explain(texts[i:i + batch], targets[i:i + batch])
            seconds[key] += time.perf_counter() - began
    row = {"model": name, "family": getattr(model.config, "model_type", None), "texts": len(texts),
           "tokens_p50": statistics.median(len(tok(t)["input_ids"]) for t in texts),
           "layer_before": explainers["before"].layer_name, "layer_default": explainers["default"].layer_name,
           "baseline_default": explainers["default"].text.baseline}
    for key, rs in results.items():
        rel = [r.convergence_delta["relative"] for r in rs]
        steps = [r.n_steps for r in rs]
        row[key] = {"share": sum(r <= BOUND for r in rel) / len(rel), "delta_p50": percentile(rel, 0.5),
                    "delta_p95": percentile(rel, 0.95), "delta_max": max(rel), "steps_p50": percentile(steps, 0.5),
                    "steps_p95": percentile(steps, 0.95), "steps_mean": statistics.mean(steps),
                    "seconds": seconds[key], "unconverged": sum(not r.converged for r in rs)}
    for key in ("before_auto", "default"):
        row[key]["x_before_time"] = seconds[key] / seconds["before"]
    if "reference" in results:
        pairs = [agreement(r, ref) for r, ref in zip(results["default"], results["reference"])]
        row["default"]["top_word_as_reference"] = sum(top for top, _ in pairs) / len(pairs)
        row["default"]["l1_error_p50"] = percentile([e for _, e in pairs], 0.5)
        row["default"]["l1_error_p95"] = percentile([e for _, e in pairs], 0.95)
        before = [agreement(r, ref) for r, ref in zip(results["before"], results["reference"])]
        row["before"]["top_word_as_reference"] = sum(top for top, _ in before) / len(before)
    print(json.dumps(row), flush=True)
    return row


MODELS = ("reviews", "bert", "distilbert", "roberta", "modernbert", "modernbert-zero-pad", "deberta-v2", "electra",
          "xlm-roberta")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="all")
    parser.add_argument("--texts", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reference-steps", type=int, default=512, help="0: no reference configuration")
    parser.add_argument("--start", type=int, default=AdaptiveSteps().start, help="adaptive schedule's first step count")
    parser.add_argument("--max", type=int, default=AdaptiveSteps().max, help="adaptive schedule's largest step count")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default=str(ROOT / "build" / "bench" / "lig_convergence"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    schedule = AdaptiveSteps(args.start, args.max, BOUND)
    names = MODELS if args.models == "all" else args.models.split(",")
    began, load_at_start = time.perf_counter(), _load()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads"
                         f" (load average at start {load_at_start})",
              "torch": torch.__version__, "schedule": vars(schedule), "batch": args.batch,
              "reference_steps": args.reference_steps, "total_s": 0.0, "rows": []}
    for name in names:  # written after every model, so that a cut-short run keeps what it measured
        report["rows"].append(measure(name, args.texts, args.batch, args.reference_steps, schedule))
        report["total_s"], report["load_at_end"] = time.perf_counter() - began, _load()
        out.with_suffix(".json").write_text(json.dumps(report, indent=2))
        out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def _load() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def markdown(report) -> str:
    s = report["schedule"]
    head = (f"Layer IG convergence, {report['date']}, {report['machine']}, torch {report['torch']}; batches of "
            f"{report['batch']}; adaptive {s['start']}→{s['max']} steps, bound {s['max_relative_delta']}; "
            f"reference {report['reference_steps']} steps.\n\n")
    lines = ["| model | texts | layer, baseline (default) | ≤ 0.05 at 50 steps (before) | ≤ 0.05 family layer, 50 | "
             "≤ 0.05 before layer, auto | ≤ 0.05 default | steps p50 / p95 (default) | time × before | "
             "top word as reference | L1 error p50 / p95 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        d = r["default"]
        lines.append(
            f"| {r['model']} | {r['texts']} | `{r['layer_default']}`, {r['baseline_default']} | {r['before']['share']:.2f} "
            f"(max {r['before']['delta_max']:.2g}) | {r['family_50']['share']:.2f} | {r['before_auto']['share']:.2f} "
            f"({r['before_auto']['steps_p50']} / {r['before_auto']['steps_p95']} steps, "
            f"×{r['before_auto']['x_before_time']:.1f}) | **{d['share']:.2f}** | {d['steps_p50']} / {d['steps_p95']} | "
            f"{d['x_before_time']:.2f} | {_agreement(r)} |")
    return head + "\n".join(lines) + "\n"


def _agreement(row) -> str:
    d = row["default"]
    if "top_word_as_reference" not in d:
        return "(no reference) | (no reference)"
    return (f"{d['top_word_as_reference']:.2f} (before {row['before']['top_word_as_reference']:.2f}) | "
            f"{d['l1_error_p50']:.3f} / {d['l1_error_p95']:.3f}")


if __name__ == "__main__":
    main()
