"""Markdown tables and a PNG chart from the benchmark's results.json.

``python -m benchmarks.report DIR/NAME.json`` rewrites NAME.md and NAME.png next to it (several
results files, e.g. one per model, are merged into ``--output``);
``--doc docs/performance.md --section cpu`` also puts the tables into that document, between its
``<!-- bench:cpu:begin -->`` and ``<!-- bench:cpu:end -->`` lines.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def _fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float) and abs(value) >= 100:
        return f"{value:,.0f}"
    if isinstance(value, float) and value and abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _cycles(throughput: dict) -> str:
    """Each timed cycle's ratio, after the warm-up cycles' (reported, not counted)."""
    timed = ", ".join(str(r) for r in throughput.get("cycle_ratios", [])) or "-"
    warmup = throughput.get("warmup_cycle_ratios")
    return f"(warm-up {', '.join(str(r) for r in warmup)}) {timed}" if warmup else timed


def markdown(results: dict) -> str:
    env = results["environment"]
    parts = [f"Measured {env['date']} on {env['device']}, {env['cpu_count']} CPU cores ({env['machine']}); "
             f"profile `{env['profile']}`; torch {env['torch']}, TorchServe {env['torchserve']}, captum "
             f"{env['captum']}, transformers {env['transformers']}; {env.get('seconds', '?')} s in all"
             + (f"; 1-minute load average {env['load_average_1min_at_start']} at the start, "
                f"{env.get('load_average_1min_at_end', '?')} at the end" if "load_average_1min_at_start" in env else "")
             + ".\n"]
    parts.append("\n**Targets**\n\n" + _table(
        ["model", "target", "measured", "target value", "met"],
        [[t["model"], t["target"] + (f" ({t['note']})" if t.get("note") else ""), t["value"],
          f"{t['comparison']} {_fmt(t['threshold'])}", "met" if t["met"] else "**not met**"]
         for t in results["targets"]]))
    models = results["models"]
    parts.append("\n**Models**\n\n" + "\n".join(f"- `{n}`: {m['description']}" for n, m in models.items()) + "\n")
    rows = []
    for name, m in models.items():
        for key in ("stock/predictions", "ours/predictions", "stock/explanations", "ours/explanations"):
            s = m["sequential"][key]
            handler, route = key.split("/")
            rows.append([name, handler, f"/{route}", s["n"], s["p50_ms"], s["p90_ms"], s["p99_ms"], s["bytes_mean"],
                         s["errors"]])
    parts.append("\n**Sequential, batch 1** (latency in ms, response bytes)\n\n" + _table(
        ["model", "handler", "route", "n", "p50", "p90", "p99", "bytes", "errors"], rows))
    conv = [[n, m["sequential"]["convergence"]["n"], m["sequential"]["convergence"]["share_le_0.05"],
             m["sequential"]["convergence"]["median_relative_delta"], m["sequential"]["convergence"]["max_relative_delta"]]
            for n, m in models.items() if "convergence" in m["sequential"]]
    if conv:
        parts.append("\n**LIG convergence** (ours, relative delta)\n\n" + _table(
            ["model", "n", "share ≤ 0.05", "median", "max"], conv))
    parts.append("\n**Concurrent /predictions throughput** (batching variants, batchSize 8, maxBatchDelay 10 ms; "
                 "stock and ours in ABBA cycles, each cycle's ratio listed; warm-up cycles, in parentheses, not counted)\n\n"
                 + _table(["model", "threads", "requests (stock / ours)", "stock req/s", "ours req/s", "ours ÷ stock",
                           "per cycle", "errors"],
                          [[n, m["throughput"]["threads"],
                            f'{m["throughput"]["stock"]["requests"]} / {m["throughput"]["ours"]["requests"]}',
                            m["throughput"]["stock"]["rps"], m["throughput"]["ours"]["rps"],
                            m["throughput"]["ratio_ours_vs_stock"],
                            _cycles(m["throughput"]),
                            m["throughput"]["stock"]["errors"] + m["throughput"]["ours"]["errors"]]
                           for n, m in models.items()]))
    rows = []
    for n, m in models.items():
        u = m["under_load"]
        alone, mixed = u["predictions_only"], u["with_explanations"]
        rows.append([n, u["threads"], alone["n"], alone["p50_ms"], alone["p99_ms"], mixed["n"], mixed["explained"]["n"],
                     mixed["p50_ms"], mixed["p99_ms"], u["ratio_p99"], mixed["labels_differ"],
                     mixed["max_probability_difference"], alone["max_probability_difference"], u["answers_unchanged"]])
    parts.append("\n**/predictions under load, ours** (prediction-only vs 10% of requests explained; answers "
                 "compared with each input's answer alone)\n\n" + _table(
                     ["model", "threads", "n", "p50", "p99", "n (mixed)", "explained", "p50 (mixed)", "p99 (mixed)",
                      "p99 ratio", "labels differ", "max prob. diff (mixed)", "max prob. diff (prediction-only)",
                      "unchanged"], rows))
    parts += _under_load(models)
    return "".join(parts)


def _early(phase: dict) -> str:
    """``answered early / rows not explained in mixed batches (mixed batches)``, from the workers' log."""
    b = phase.get("batches")
    if not b:
        return "–"
    return (f"{b['answered_early']:,} / {b['not_explained_in_mixed']:,} ({b['mixed_batches']:,} batches)"
            + ("" if b.get("complete", True) else ", log incomplete"))


def _under_load(models: dict) -> list[str]:
    """The tables of /predictions under load: prediction-only, 10% explained served synchronously,
    and 10% explained with asyncCommunication."""
    loads = {n: m["under_load"] for n, m in models.items() if "with_explanations_async" in m["under_load"]}
    if not loads:
        return []
    header = ["model", "n", "p50", "p99", "sync: p50", "p99", "p99 ratio", "expl. work p50", "unchanged",
              "async: p50", "p99", "p99 ratio", "answered early", "expl. work p50", "unchanged"]

    def row(name, u):
        base, sync, lanes = u["predictions_only"], u["with_explanations"], u["with_explanations_async"]

        def work(phase):
            return phase.get("explanation_work_ms", {}).get("p50")

        counts = [base["n"], sync["n"], lanes["n"]]
        return [name, " / ".join(f"{n:,}" for n in counts), base["p50_ms"], base["p99_ms"],
                sync["p50_ms"], sync["p99_ms"], u["ratio_p99"], work(sync), u["answers_unchanged"],
                lanes["p50_ms"], lanes["p99_ms"], u["ratio_p99_async"], _early(lanes), work(lanes),
                u["answers_unchanged_async"]]

    parts = ["\n**/predictions under load, closed loop** (ours; prediction-only, then 10% explained served "
             "synchronously and with `asyncCommunication` (async: the worker batches itself and explains in a lane of "
             "its own); n: /predictions answers in each; answered early: rows answered before their batch's "
             "explanation work, of the rows not explained in batches that held an explanation; expl. work: the "
             "handler's own time per explanation, from its log; latency in ms)\n\n"
             + _table(header, [[f"{n} ({u['threads']} threads)"] + row(n, u)[1:] for n, u in loads.items()])]
    opened = {n: u["open_loop"] for n, u in loads.items() if "open_loop" in u}
    if opened:
        rows = []
        for n, o in opened.items():
            late = sum(o[p].get("sent_late_over_10ms", 0) for p in ("predictions_only", "with_explanations",
                                                                    "with_explanations_async") if p in o)
            rows.append([f"{n} ({o['rate_rps']:g} req/s)"] + row(n, o)[1:] + [late])
        parts.append("\n**/predictions under load, open loop** (the same phases with "
                     "requests sent at a fixed Poisson rate from a pool of threads, latency from the scheduled send; "
                     "rate: a share of the closed-loop explained phases' throughput; sent late: requests sent over "
                     "10 ms after their time, all phases)\n\n" + _table(header + ["sent late"], rows))
    return parts


def chart(results: dict, path: Path) -> None:
    """Four panels: batch-1 p50 latency, concurrent throughput, response size, /predictions p99 under load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    names = list(models)
    keys = ["stock/predictions", "ours/predictions", "stock/explanations", "ours/explanations"]
    colours = ["#9ecae1", "#3182bd", "#fdae6b", "#e6550d"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    width = 0.2
    for j, key in enumerate(keys):
        xs = [i + (j - 1.5) * width for i in range(len(names))]
        axes[0].bar(xs, [models[n]["sequential"][key]["p50_ms"] for n in names], width, label=key, color=colours[j])
        axes[2].bar(xs, [max(models[n]["sequential"][key]["bytes_mean"], 1) for n in names], width, label=key,
                    color=colours[j])
    for j, side in enumerate(["stock", "ours"]):
        xs = [i + (j - 0.5) * 0.35 for i in range(len(names))]
        axes[1].bar(xs, [models[n]["throughput"][side]["rps"] for n in names], 0.35, label=f"{side}/predictions",
                    color=colours[j])
    _load_panel(axes[3], models, names)
    titles = ["p50 latency, batch 1 (ms, log)", "/predictions throughput, concurrent (req/s, log)", "response size (bytes, log)"]
    for ax, title in zip(axes, titles):
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    env = results["environment"]
    fig.suptitle(f"torchserve-explain vs stock handlers: {env['device']}, {env['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _load_panel(ax, models: dict, names: list) -> None:
    """/predictions p99 under load: prediction-only, 10% explained served synchronously and with
    asyncCommunication; closed loop, and open loop where measured."""
    series = [("closed", "predictions_only", "prediction-only", "#bdbdbd"),
              ("closed", "with_explanations", "10% explained", "#31a354"),
              ("closed", "with_explanations_async", "10% explained, asyncCommunication", "#fd8d3c"),
              ("open", "predictions_only", "open loop: prediction-only", "#969696"),
              ("open", "with_explanations", "open loop: 10% explained", "#756bb1"),
              ("open", "with_explanations_async", "open loop: 10% explained, asyncCommunication", "#fdd0a2")]

    def value(name, loop, phase):
        u = models[name]["under_load"]
        u = u.get("open_loop", {}) if loop == "open" else u
        return u.get(phase, {}).get("p99_ms")

    shown = [s for s in series if any(value(n, s[0], s[1]) is not None for n in names)]
    width = 0.8 / len(shown)
    for j, (loop, phase, label, colour) in enumerate(shown):
        xs = [i + (j - (len(shown) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, [value(n, loop, phase) or 0 for n in names], width, label=label, color=colour)
    ax.set_xticks(range(len(names)), names)
    ax.set_yscale("log")
    ax.set_title("/predictions p99 under load (ms, log)")
    ax.legend(fontsize=7)


def replace_section(doc: Path, section: str, text: str) -> None:
    """Replace what lies between ``<!-- bench:SECTION:begin -->`` and ``...:end -->`` in ``doc``."""
    begin, end = f"<!-- bench:{section}:begin -->", f"<!-- bench:{section}:end -->"
    content = doc.read_text()
    if begin not in content or end not in content:
        raise SystemExit(f"{doc}: no {begin} ... {end} markers")
    head, rest = content.split(begin, 1)
    doc.write_text(head + begin + "\n" + text.rstrip() + "\n" + end + rest.split(end, 1)[1])


def merge(runs: list[dict]) -> dict:
    """One results dict from runs of separate models (environment of the first, with its date)."""
    merged = {"environment": dict(runs[0]["environment"]), "models": {}, "targets": []}
    for run in runs:
        merged["models"].update(run["models"])
        merged["targets"] += run["targets"]
    merged["environment"]["seconds"] = round(sum(r["environment"].get("seconds", 0) for r in runs), 1)
    return merged


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="results.json files written by python -m benchmarks.run")
    parser.add_argument("--output", help="where the (merged) JSON goes; default: the first results file")
    parser.add_argument("--doc", help="a markdown document to update (e.g. docs/performance.md)")
    parser.add_argument("--section", default="cpu", help="the section name of its markers (cpu, gpu)")
    args = parser.parse_args(argv)
    results = merge([json.loads(Path(p).read_text()) for p in args.results])
    path = Path(args.output or args.results[0])
    if args.output or len(args.results) > 1:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
    text = markdown(results)
    path.with_suffix(".md").write_text(text)
    chart(results, path.with_suffix(".png"))
    if args.doc:
        replace_section(Path(args.doc), args.section, text)


if __name__ == "__main__":
    main()
