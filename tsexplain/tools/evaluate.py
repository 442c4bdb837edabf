"""``tsexplain-eval``: score a model's explanations on the synthetic data sets.

    tsexplain-eval image --model-dir build/demo/shapes --out build/eval/shapes
    tsexplain-eval text --url http://127.0.0.1:8080 --model reviews --key-file key_file.json

``image``: deletion and insertion AUC next to a random-map baseline, and the pointing game
on the synthetic shapes (whose boxes are known). ``text``: cue-word hit@k on the synthetic
reviews, and the target probability as the top words are deleted, next to deleting random
words. Prints the metrics and writes ``report.json``, ``report.md`` and ``curves.png`` to
``--out``. See :mod:`tsexplain.tools.evaluation` for the definitions.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from . import evaluation as ev
from .eval_backends import (EvaluationError, InProcessImage, InProcessText, ServedImage, ServedText,
                            read_inference_key)
from .synthetic import reviews, shapes

DEFAULT_SEED = 20261123  # not a training or validation seed of the demo models


def evaluate_images(backend, method: Optional[str], n: int, seed: int, steps: int, random_maps: int,
                    image_size: int, batch_size: int = 64) -> dict:
    """Deletion/insertion curves (method and random maps) and the pointing game on ``n`` shapes."""
    samples = shapes.generate(n, seed, image_size)
    images = [np.asarray(s.image.convert("RGB")) for s in samples]
    explained = backend.explain(images, method)
    maps = [e.heatmap for e in explained]
    targets = [e.target for e in explained]
    curves = ev.image_curves(images, maps, targets, backend.predict_proba, steps, seed, batch_size)
    baseline = ev.random_image_curves(images, [m.shape for m in maps], targets, backend.predict_proba, steps,
                                      random_maps, seed, batch_size)
    pointing = [ev.pointing_hit(m, s.box, image_size, image_size) for m, s in zip(maps, samples)]
    correct = [t == s.label for t, s in zip(targets, samples)]
    deletion_gap = baseline.deletion_auc - curves.deletion_auc  # > 0: the map deletes faster than random
    insertion_gap = curves.insertion_auc - baseline.insertion_auc
    metrics = {
        "deletion_auc": ev.summarize(curves.deletion_auc),
        "deletion_auc_random": ev.summarize(baseline.deletion_auc),
        "deletion_auc_gap": ev.summarize(deletion_gap),
        "insertion_auc": ev.summarize(curves.insertion_auc),
        "insertion_auc_random": ev.summarize(baseline.insertion_auc),
        "insertion_auc_gap": ev.summarize(insertion_gap),
        "pointing_game": float(np.mean(pointing)),
        "accuracy": float(np.mean(correct)),
        # Per true class: a class the model gives to a blank image (the demo's "star") cannot lose
        # probability when its evidence is deleted, whatever the map.
        "deletion_auc_by_class": {
            name: {"n": int(sum(rows)), "deletion_auc": float(curves.deletion_auc[rows].mean()),
                   "deletion_auc_random": float(baseline.deletion_auc[rows].mean())}
            for name, rows in ((name, np.array([s.label == c for s in samples]))
                               for c, name in enumerate(shapes.SHAPE_CLASSES)) if rows.any()},
    }
    return {
        "task": "image",
        "method": explained[0].method if explained else method,
        "metrics": metrics,
        "settings": {"n": n, "seed": seed, "steps": steps, "random_maps": random_maps, "image_size": image_size,
                     "map_shape": list(maps[0].shape) if maps else None,
                     "deletion_substrate": "the image's mean colour",
                     "insertion_start": f"Gaussian blur, radius {ev.default_blur_radius(image_size, image_size):g} px",
                     "order": "map upsampled bilinearly to the input, most salient first, ties in random order"},
        "curves": {"x": np.linspace(0, 1, steps + 1).tolist(),
                   "deletion": curves.deletion.mean(0).tolist(), "deletion_random": baseline.deletion.mean(0).tolist(),
                   "insertion": curves.insertion.mean(0).tolist(),
                   "insertion_random": baseline.insertion.mean(0).tolist()},
        # deletion_end: the explained class's probability once every pixel is deleted (the mean colour)
        "per_sample": [{"label": s.label, "target": t, "pointing_hit": bool(p), "deletion_auc": float(d),
                        "insertion_auc": float(i), "deletion_auc_random": float(dr),
                        "insertion_auc_random": float(ir), "deletion_end": float(end)}
                       for s, t, p, d, i, dr, ir, end in zip(samples, targets, pointing, curves.deletion_auc,
                                                             curves.insertion_auc, baseline.deletion_auc,
                                                             baseline.insertion_auc, curves.deletion[:, -1])],
    }


def evaluate_text(backend, method: Optional[str], n: int, seed: int, k: int, max_words: int, repeats: int,
                  batch_size: int = 64) -> dict:
    """Cue hit@k and word-deletion curves (method and random orders) on ``n`` reviews."""
    samples = reviews.generate(n, seed)
    texts = [s.text for s in samples]
    explained = backend.explain(texts, method)
    words = [e.words for e in explained]
    targets = [e.target for e in explained]
    curves = ev.word_deletion_curves(texts, words, targets, backend.predict_proba, max_words, "signed", batch_size)
    baseline = ev.random_word_deletion_curves(texts, words, targets, backend.predict_proba, max_words, repeats,
                                              seed, batch_size)
    hits = [ev.top_k_hit(w, s.sentiment_span, k) for w, s in zip(words, samples)]
    correct = [t == s.label for t, s in zip(targets, samples)]
    drop, drop_random = curves[:, :1] - curves, baseline[:, :1] - baseline  # p(full text) - p(k words deleted)
    metrics = {
        f"cue_hit_at_{k}": float(np.mean(hits)),
        "cue_hit_at_1": float(np.mean([ev.top_k_hit(w, s.sentiment_span, 1) for w, s in zip(words, samples)])),
        "accuracy": float(np.mean(correct)),
        "deletion_auc": ev.summarize(ev.auc(curves)),
        "deletion_auc_random": ev.summarize(ev.auc(baseline)),
    }
    for j in sorted({1, min(3, max_words), max_words}):
        metrics[f"drop_at_{j}"] = ev.summarize(drop[:, j])
        metrics[f"drop_at_{j}_random"] = ev.summarize(drop_random[:, j])
    return {
        "task": "text",
        "method": explained[0].method if explained else method,
        "metrics": metrics,
        "settings": {"n": n, "seed": seed, "k": k, "max_words": max_words, "random_repeats": repeats,
                     "ranking": "signed attribution towards the target, largest first",
                     "hit_ranking": "|attribution|, against the sentiment cue word's span"},
        "curves": {"x": list(range(max_words + 1)), "deletion": curves.mean(0).tolist(),
                   "deletion_random": baseline.mean(0).tolist()},
        "per_sample": [{"label": s.label, "target": t, "hit": bool(h), "curve": c.tolist(), "random": r.tolist()}
                       for s, t, h, c, r in zip(samples, targets, hits, curves, baseline)],
    }


# -------------------------------------------------------------------------- report

def _fmt(value) -> str:
    if isinstance(value, dict):
        return f"{value['mean']:.3f} ± {value['sem']:.3f}"
    return f"{value:.3f}"


def metric_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(metric, method, random baseline, better) rows; ± is the standard error over samples."""
    m = report["metrics"]
    if report["task"] == "image":
        return [("deletion AUC", _fmt(m["deletion_auc"]), _fmt(m["deletion_auc_random"]), "lower"),
                ("insertion AUC", _fmt(m["insertion_auc"]), _fmt(m["insertion_auc_random"]), "higher"),
                ("pointing game", _fmt(m["pointing_game"]), "", "higher"),
                ("accuracy", _fmt(m["accuracy"]), "", "")]
    k = report["settings"]["k"]
    rows = [(f"cue hit@{k}", _fmt(m[f"cue_hit_at_{k}"]), "", "higher"),
            ("cue hit@1", _fmt(m["cue_hit_at_1"]), "", "higher")]
    rows += [(f"prob. drop, top {name[8:]} deleted", _fmt(m[name]), _fmt(m[name + "_random"]), "higher")
             for name in m if name.startswith("drop_at_") and not name.endswith("_random")]
    rows += [("deletion AUC (per word)", _fmt(m["deletion_auc"]), _fmt(m["deletion_auc_random"]), "lower"),
             ("accuracy", _fmt(m["accuracy"]), "", "")]
    return rows


def format_table(report: dict) -> str:
    header = ("metric", f"{report['method']}", "random", "better")
    rows = [header] + metric_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_markdown(report: dict, path: Path) -> None:
    s = report["settings"]
    lines = [f"# Explanation evaluation: {report['task']}, {report['method']}", "",
             f"- backend: {report['backend']}", f"- date: {report['date']}, machine: {report['machine']}",
             f"- samples: {s['n']} (seed {s['seed']}), elapsed {report['elapsed_s']:.1f} s", ""]
    lines += [f"- {key}: {value}" for key, value in s.items() if key not in ("n", "seed")]
    lines += ["", "| metric | " + report["method"] + " | random | better |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in metric_rows(report)]
    if "deletion_auc_by_class" in report["metrics"]:
        lines += ["", "Deletion AUC by true class (method / random):", ""]
        lines += [f"- {name} (n={v['n']}): {v['deletion_auc']:.3f} / {v['deletion_auc_random']:.3f}"
                  for name, v in report["metrics"]["deletion_auc_by_class"].items()]
    lines += ["", "± is the standard error of the mean over samples. Curves: `curves.png`.", ""]
    path.write_text("\n".join(lines))


def plot_curves(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = report["curves"]
    panels = [("deletion", "insertion")] if report["task"] == "image" else [("deletion",)]
    names = panels[0]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        ours, rand = c[name], c[f"{name}_random"]
        ax.plot(c["x"], ours, marker="o", markersize=3, label=f"{report['method']} (AUC {ev.auc(ours):.3f})")
        ax.plot(c["x"], rand, marker="o", markersize=3, linestyle="--", label=f"random (AUC {ev.auc(rand):.3f})")
        if report["task"] == "image":
            ax.set_xlabel(f"fraction of pixels {'removed' if name == 'deletion' else 'inserted'}")
        else:
            ax.set_xlabel("words deleted")
        ax.set_ylabel("target probability")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{name} ({report['task']}, n={report['settings']['n']})")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: dict, out: Path) -> list[Path]:
    """report.json, report.md and curves.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md", out / "curves.png"]
    paths[0].write_text(json.dumps(report, indent=1))
    write_markdown(report, paths[1])
    plot_curves(report, paths[2])
    return paths


# ---------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsexplain-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="task", required=True)
    image = sub.add_parser("image", help="Grad-CAM-style maps on the synthetic shapes")
    text = sub.add_parser("text", help="word attributions on the synthetic reviews")
    for p in (image, text):
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("--url", help="TorchServe inference address, e.g. http://127.0.0.1:8080")
        where.add_argument("--model-dir", help="evaluate in process: a model folder (see README)")
        p.add_argument("--model", help="the served model's name (with --url)")
        p.add_argument("--method", help="explanation method (default: the model's default)")
        p.add_argument("--n", type=int, default=32, help="samples (default 32)")
        p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="data and randomness seed")
        p.add_argument("--out", default="build/eval", help="report folder (default build/eval)")
        p.add_argument("--batch-size", type=int, default=64, help="inputs per predict call in process")
        p.add_argument("--key", help="TorchServe inference key (default: from --key-file)")
        p.add_argument("--key-file", help="TorchServe's key_file.json (default: ./key_file.json if present)")
        p.add_argument("--explain-token", help="value of the X-Explain-Token header")
        p.add_argument("--priority", help="value of the priority header")
        p.add_argument("--priority-header", default="X-Priority", help="name of the priority header")
        p.add_argument("--concurrency", type=int, default=8, help="requests in flight to the server (default 8)")
    image.add_argument("--steps", type=int, default=16, help="deletion/insertion steps (default 16)")
    image.add_argument("--random-maps", type=int, default=3, help="random maps per image (default 3)")
    image.add_argument("--image-size", type=int, help="served model's input size (default 64; in process: "
                                                        "the model folder's image_size)")
    text.add_argument("--k", type=int, default=3, help="hit@k (default 3)")
    text.add_argument("--max-words", type=int, default=5, help="words deleted, at most (default 5)")
    text.add_argument("--random-repeats", type=int, default=3, help="random deletion orders per text (default 3)")
    return parser


def _backend(args):
    if args.url:
        if not args.model:
            raise EvaluationError("--url needs --model")
        kind = ServedImage if args.task == "image" else ServedText
        return kind(args.url, args.model, read_inference_key(args.key, args.key_file), args.explain_token,
                    args.priority, args.priority_header, args.concurrency)
    kind = InProcessImage if args.task == "image" else InProcessText
    return kind(args.model_dir, args.batch_size)


def run(args) -> dict:
    for name in ("n", "batch_size", "concurrency") + (("steps", "random_maps") if args.task == "image"
                                                      else ("k", "max_words", "random_repeats")):
        if getattr(args, name) < 1:
            raise EvaluationError(f"--{name.replace('_', '-')} must be >= 1")
    backend = _backend(args)
    began = time.perf_counter()
    if args.task == "image":
        size = args.image_size or getattr(backend, "image_size", None) or 64
        report = evaluate_images(backend, args.method, args.n, args.seed, args.steps, args.random_maps, size,
                                 args.batch_size)
    else:
        report = evaluate_text(backend, args.method, args.n, args.seed, args.k, args.max_words,
                               args.random_repeats, args.batch_size)
    report["elapsed_s"] = round(time.perf_counter() - began, 2)
    report["backend"] = backend.description
    report["date"] = datetime.date.today().isoformat()
    report["machine"] = f"{platform.machine()}, {platform.system()}, python {platform.python_version()}"
    return report


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        report = run(args)
    except EvaluationError as exc:
        print(f"tsexplain-eval: error: {exc}", file=sys.stderr)
        return 2
    paths = write_report(report, Path(args.out))
    print(f"{report['task']} explanations, method {report['method']}, {report['settings']['n']} samples "
          f"({report['backend']}, {report['elapsed_s']:.1f} s)")
    print(format_table(report))
    print("report: " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
