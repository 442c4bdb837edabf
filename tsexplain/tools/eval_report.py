"""``tsexplain-eval``'s report: the printed table, ``report.json``, ``report.md``,
``curves.png`` and, with the sanity check, ``sanity.png``."""
from __future__ import annotations

import json
from pathlib import Path

from . import evaluation as ev


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, dict):
        return f"{value['mean']:.3f} ± {value['sem']:.3f}"
    return f"{value:.3f}"


def metric_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(metric, method, random baseline, better) rows; ± is the standard error over samples."""
    m = report.get("metrics")
    if not m:
        return []
    if report["task"] == "image":
        rows = [("deletion AUC", _fmt(m["deletion_auc"]), _fmt(m["deletion_auc_random"]), "lower"),
                ("insertion AUC", _fmt(m["insertion_auc"]), _fmt(m["insertion_auc_random"]), "higher")]
        if "pointing_game" in m:
            rows.append(("pointing game", _fmt(m["pointing_game"]), "", "higher"))
        if "accuracy" in m:
            rows.append(("accuracy", _fmt(m["accuracy"]), "", ""))
        return rows
    rows = []
    k = report["settings"]["k"]
    if f"cue_hit_at_{k}" in m:
        rows += [(f"cue hit@{k}", _fmt(m[f"cue_hit_at_{k}"]), "", "higher"),
                 ("cue hit@1", _fmt(m["cue_hit_at_1"]), "", "higher")]
    rows += [(f"prob. drop, top {name[8:]} deleted", _fmt(m[name]), _fmt(m[name + "_random"]), "higher")
             for name in m if name.startswith("drop_at_") and not name.endswith("_random")]
    rows.append(("deletion AUC (per word)", _fmt(m["deletion_auc"]), _fmt(m["deletion_auc_random"]), "lower"))
    if "accuracy" in m:
        rows.append(("accuracy", _fmt(m["accuracy"]), "", ""))
    return rows


def sanity_rows(report: dict) -> list[tuple[str, str, str, str, str]]:
    """(randomised down to, mean rank correlation, std, mean of |map| correlation, inputs) per stage."""
    sanity = report.get("sanity")
    if not sanity:
        return []
    return [(s["block"], _fmt(s["mean"]), _fmt(s["std"]), _fmt(s["mean_abs"]), str(s["n"])) for s in sanity["stages"]]


def _table(rows: list[tuple]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_table(report: dict) -> str:
    """What the command prints: the metrics, then the sanity check's stages and verdict."""
    parts = []
    rows = metric_rows(report)
    if rows:
        parts.append(_table([("metric", f"{report['method']}", "random", "better")] + rows))
    if report.get("sanity"):
        sanity = report["sanity"]
        parts.append("sanity check (cascading randomisation, top block first; Spearman rank correlation with "
                     "the intact model's maps):")
        parts.append(_table([("randomised down to", "mean", "std", "mean |map|", "n")] + sanity_rows(report)))
        parts.append(f"sanity check: {sanity['verdict'].upper()}: {sanity['reason']}")
    return "\n".join(parts)


def write_markdown(report: dict, path: Path) -> None:
    s = report["settings"]
    lines = [f"# Explanation evaluation: {report['task']}, {report['method']}", "",
             f"- backend: {report['backend']}", f"- data: {report['data']}",
             f"- date: {report['date']}, machine: {report['machine']}",
             f"- samples: {s['n']} (seed {s['seed']}), elapsed {report['elapsed_s']:.1f} s"]
    lines += [f"- {key}: {value}" for key, value in s.items() if key not in ("n", "seed")]
    lines += [f"- note: {note}" for note in report.get("notes", [])]
    rows = metric_rows(report)
    if rows:
        lines += ["", "| metric | " + report["method"] + " | random | better |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    by_class = (report.get("metrics") or {}).get("deletion_auc_by_class")
    if by_class:
        lines += ["", "Deletion AUC by true class (method / random):", ""]
        lines += [f"- {name} (n={v['n']}): {v['deletion_auc']:.3f} / {v['deletion_auc_random']:.3f}"
                  for name, v in by_class.items()]
    if rows:
        lines += ["", "± is the standard error of the mean over samples. Curves: `curves.png`."]
    sanity = report.get("sanity")
    if sanity:
        lines += ["", "## Sanity check: cascading model randomisation", "",
                  f"Spearman rank correlation of each input's map with the intact model's, as the blocks are "
                  f"randomised from the top ({sanity['inputs']} inputs, seed {sanity['seed']}; inputs whose "
                  f"intact map is constant are left out: {sanity['constant_originals']}).", "",
                  "| randomised down to | mean | std | mean, \\|map\\| | inputs |", "|---|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in sanity_rows(report)]
        lines += ["", f"**{sanity['verdict'].upper()}**: {sanity['reason']}.", "", f"Rule: {sanity['rule']}.",
                  "Plot: `sanity.png`."]
    lines.append("")
    path.write_text("\n".join(lines))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(report: dict, path: Path) -> None:
    plt = _pyplot()
    c = report["curves"]
    names = ("deletion", "insertion") if report["task"] == "image" else ("deletion",)
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


def plot_sanity(report: dict, path: Path) -> None:
    plt = _pyplot()
    sanity = report["sanity"]
    stages = sanity["stages"]
    x = list(range(len(stages)))
    means = [s["mean"] if s["mean"] is not None else float("nan") for s in stages]
    stds = [s["std"] for s in stages]
    fig, ax = plt.subplots(figsize=(max(5, 0.55 * len(stages) + 2), 4))
    ax.errorbar(x, means, yerr=stds, marker="o", capsize=3, label=f"{report['method']} (mean ± std)")
    ax.axhline(sanity["threshold"], color="grey", linestyle="--", linewidth=1, label=f"threshold {sanity['threshold']:g}")
    ax.set_xticks(x, [s["block"] if k else "none" for k, s in enumerate(stages)], rotation=60, ha="right", fontsize=7)
    ax.set_ylim(-1.02, 1.02)
    ax.set_ylabel("Spearman vs intact map")
    ax.set_title(f"cascading randomisation ({report['task']}): {sanity['verdict'].upper()}")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: dict, out: Path) -> list[Path]:
    """report.json, report.md, curves.png (with curves) and sanity.png (with the sanity check) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md"]
    paths[0].write_text(json.dumps(report, indent=1))
    write_markdown(report, paths[1])
    if report.get("curves"):
        paths.append(out / "curves.png")
        plot_curves(report, paths[-1])
    if report.get("sanity"):
        paths.append(out / "sanity.png")
        plot_sanity(report, paths[-1])
    return paths
