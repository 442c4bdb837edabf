"""What the audit trail costs, through a real TorchServe: the trail on against off on one model.

One TorchServe serves our handler on the same weights four ways: ``<name>`` and ``<name>_on``
(``batchSize: 1``; the trail off and on) and ``<name>_b8`` and ``<name>_b8_on`` (batches of 8),
the trail being one SQLite file per variant with the defaults (``record: all``,
``synchronous: full``). The explanation cache is off, so every explanation is computed.

- ``explanations``: batch-1 ``/explanations`` latency as the client sees it, off and on
  interleaved request by request in ABBA order (off, on, on, off, ...), so that the other jobs
  of a shared machine fall on both alike; the ratio of the medians, and the median of the
  per-round ratios (each round's on/off means). The records' write time, from the workers'
  log lines (``audit records written=.. write_ms=..``).
- ``predictions``: batch-1 ``/predictions`` latency, interleaved the same way (nothing is recorded).
- ``throughput``: concurrent ``/predictions`` on the batching variants, phases off, on, on, off
  (``--cycles`` times): requests per second; the same with one request in ten explained (the explained ones are
  recorded on ``_on``): the predictions' rate.

Every answer is checked (200; ``explanation_id`` on ``_on`` only, and in its trail, which
verifies at the end). Writes ``audit_cost.json`` and ``audit_cost.md`` into ``--out``.

    python -m benchmarks.audit_cost [--model resnet50|shapes] [--rounds 60] [--seconds 40] [--cycles 3] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import models as bench_models  # noqa: E402
from benchmarks.run import EXPLAIN_HEADERS, EXPLAIN_TOKEN, environment, percentile  # noqa: E402
from tsexplain.serving.audit import Filters, open_store  # noqa: E402
from tsexplain.tools.launcher import TorchServe  # noqa: E402

WRITE_LINE = re.compile(r"W-\d+-(?P<model>\S+)_[^_\s]+-stdout MODEL_LOG - audit records written=(?P<n>\d+) "
                        r"lost=(?P<lost>\d+) write_ms=(?P<ms>[\d.]+)")


def stage(name: str, store: Path, n_inputs: int) -> bench_models.Model:
    """The model's variants, and copies of ours with the trail on (one SQLite file each)."""
    model = bench_models.BUILDERS[name](store, n_inputs=n_inputs)
    for variant in (name, f"{name}_b8"):
        source = store / variant
        manifest = json.loads((source / "MAR-INF" / "MANIFEST.json").read_text())
        config = yaml.safe_load((source / manifest["model"]["configFile"]).read_text())
        audit = {"record": "all", "sink": f"sqlite://{store.parent / 'trails' / variant}.db"}
        bench_models.batched_copy(source, {**config, "explain": {**config.get("explain", {}), "audit": audit}}, "_on")
    return model


def timed_call(ts: TorchServe, model: bench_models.Model, variant: str, route: str, i: int) -> tuple[float, dict]:
    body, content_type = model.body(i, False, route == "explanations")
    headers = {"Content-Type": content_type, **(EXPLAIN_HEADERS if route == "explanations" else {})}
    began = time.perf_counter()
    status, raw = ts.request("POST", f"{ts.inference_url}/{route}/{variant}", body, headers, timeout=600)
    ms = (time.perf_counter() - began) * 1000
    if status != 200:
        raise RuntimeError(f"{variant} {route}: status {status}: {raw[:200]!r}")
    answer = json.loads(raw)
    if route == "explanations" and ("explanation_id" in answer["explanation"]) != variant.endswith("_on"):
        raise RuntimeError(f"{variant}: explanation_id {'missing' if variant.endswith('_on') else 'unexpected'}")
    return ms, answer


def interleaved(ts, model, route: str, rounds: int, warmup: int) -> dict:
    """Batch-1 latency of ``route`` off and on, ABBA within each round."""
    off, on = model.name, f"{model.name}_on"
    for i in range(warmup):
        for variant in (off, on):
            timed_call(ts, model, variant, route, i)
    times = {off: [], on: []}
    ratios, ids = [], []
    loads = [os.getloadavg()[0]]
    for r in range(rounds):
        this = {off: [], on: []}
        for k, variant in enumerate((off, on, on, off)):
            ms, answer = timed_call(ts, model, variant, route, 4 * r + k)
            this[variant].append(ms)
            if route == "explanations" and variant == on:
                ids.append(answer["explanation"]["explanation_id"])
        for variant in this:
            times[variant] += this[variant]
        ratios.append(statistics.fmean(this[on]) / statistics.fmean(this[off]))
    loads.append(os.getloadavg()[0])

    def stats(values):
        return {"n": len(values), "p50_ms": round(percentile(values, 50), 2), "p90_ms": round(percentile(values, 90), 2),
                "mean_ms": round(statistics.fmean(values), 2)}

    return {"off": stats(times[off]), "on": stats(times[on]),
            "ratio_of_medians": round(percentile(times[on], 50) / percentile(times[off], 50), 4),
            "median_round_ratio": round(statistics.median(ratios), 4),
            "load_1min": [round(v, 2) for v in loads], "ids": ids}


def phase(ts, model, variant: str, seconds: float, threads: int, explained_every: int = 0) -> dict:
    """Concurrent load on ``variant`` for ``seconds``: the predictions' rate (and errors)."""
    lock, stop = threading.Lock(), time.monotonic() + seconds
    counts = {"predictions": 0, "explanations": 0, "errors": 0}
    counter = iter(range(10**9))

    def worker():
        while time.monotonic() < stop:
            with lock:
                i = next(counter)
            route = "explanations" if explained_every and i % explained_every == 0 else "predictions"
            try:
                timed_call(ts, model, variant, route, i)
                key = route
            except RuntimeError:
                key = "errors"
            with lock:
                counts[key] += 1

    began = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    wall = time.perf_counter() - began
    return {**counts, "seconds": round(wall, 2), "prediction_rps": round(counts["predictions"] / wall, 3)}


def throughput(ts, model, seconds: float, threads: int, explained_every: int, cycles: int) -> dict:
    """``cycles`` times off, on, on, off, each phase ``seconds / 2`` long."""
    off, on = f"{model.name}_b8", f"{model.name}_b8_on"
    out = {}
    for label, every in (("predictions_only", 0), ("one_in_ten_explained", explained_every)):
        totals = {off: [], on: []}
        loads = [os.getloadavg()[0]]
        for variant in (off, on, on, off) * cycles:
            totals[variant].append(phase(ts, model, variant, seconds / 2, threads, every))
        loads.append(os.getloadavg()[0])
        rps = {v: sum(p["predictions"] for p in ps) / sum(p["seconds"] for p in ps) for v, ps in totals.items()}
        out[label] = {"off_rps": round(rps[off], 3), "on_rps": round(rps[on], 3),
                      "ratio_on_vs_off": round(rps[on] / rps[off], 4) if rps[off] else None,
                      "phase_rps": {"off": [p["prediction_rps"] for p in totals[off]],
                                    "on": [p["prediction_rps"] for p in totals[on]]},
                      "errors": sum(p["errors"] for ps in totals.values() for p in ps),
                      "explanations": sum(p["explanations"] for ps in totals.values() for p in ps),
                      "threads": threads, "load_1min": [round(v, 2) for v in loads]}
    return out


def writes(ts: TorchServe, model: str) -> dict:
    ms = [float(m["ms"]) for m in WRITE_LINE.finditer(ts.log_text()) if m["model"] == model]
    lost = sum(int(m["lost"]) for m in WRITE_LINE.finditer(ts.log_text()) if m["model"] == model)
    return {"batches": len(ms), "lost": lost, "write_ms_p50": round(percentile(ms, 50), 2) if ms else None,
            "write_ms_p99": round(percentile(ms, 99), 2) if ms else None}


def trail_check(sink: str, ids: list) -> dict:
    store = open_store(sink, create=False)
    try:
        stored = {r.id for r in store.records(Filters())}
        report, _ = store.verify()
    finally:
        store.close()
    return {"records": len(stored), "verified": report.ok, "answered_ids_missing": len(set(ids) - stored)}


def markdown(result: dict) -> str:
    env, seq, pred = result["environment"], result["explanations"], result["predictions"]
    lines = [f"Audit trail on against off, {result['description']}: {env['date']}, {env['cpu_count']} CPUs "
             f"({env['device']}), load average {env['load_average_1min_at_start']} at the start and "
             f"{env['load_average_1min_at_end']} at the end.", "",
             "| batch 1, ABBA | n each | off p50 ms | on p50 ms | off mean ms | on mean ms | on/off medians | "
             "median round ratio |", "|---|---|---|---|---|---|---|---|"]
    for label, s in (("/explanations", seq), ("/predictions", pred)):
        lines.append(f"| {label} | {s['off']['n']} | {s['off']['p50_ms']} | {s['on']['p50_ms']} | {s['off']['mean_ms']} "
                     f"| {s['on']['mean_ms']} | {s['ratio_of_medians']} | {s['median_round_ratio']} |")
    w = result["writes"]
    lines += ["", f"Record writes on `{result['model']}_on`: {w['batches']} commits, p50 {w['write_ms_p50']} ms, "
              f"p99 {w['write_ms_p99']} ms, {w['lost']} lost; trail: {result['trail']['records']} records, "
              f"verified {result['trail']['verified']}, answered ids missing {result['trail']['answered_ids_missing']}.",
              "", "| concurrent /predictions (batches of 8) | threads | off req/s | on req/s | on/off | explained | errors |",
              "|---|---|---|---|---|---|---|"]
    for label, t in result["throughput"].items():
        lines.append(f"| {label.replace('_', ' ')} | {t['threads']} | {t['off_rps']} | {t['on_rps']} | "
                     f"{t['ratio_on_vs_off']} | {t['explanations']} | {t['errors']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", choices=["resnet50", "shapes"])
    parser.add_argument("--rounds", type=int, default=60, help="ABBA rounds of batch-1 requests (4 requests each)")
    parser.add_argument("--seconds", type=float, default=40, help="throughput: seconds per variant (two halves)")
    parser.add_argument("--cycles", type=int, default=3, help="throughput: ABBA cycles (phases of --seconds / 2)")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a few requests (the test suite's check)")
    parser.add_argument("--out", default=str(ROOT / "build" / "bench"))
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds, args.warmup, args.cycles = 3, 2, 1, 1
    work = Path(tempfile.mkdtemp(prefix="tsexplain-audit-cost-"))
    try:
        return measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the staged models and the trails: the results are in --out


def measure(args, work: Path) -> int:
    model = stage(args.model, work / "store", n_inputs=8)
    variants = {v: v for v in (model.name, f"{model.name}_on", f"{model.name}_b8", f"{model.name}_b8_on")}
    result = {"environment": environment("audit"), "model": model.name, "description": model.description}
    properties = {"default_response_timeout": "600"}
    with TorchServe(work / "store", variants, work / "ts", properties=properties,
                    env={bench_models.EXPLAIN_TOKEN_ENV: EXPLAIN_TOKEN}) as ts:
        result["explanations"] = interleaved(ts, model, "explanations", args.rounds, args.warmup)
        result["predictions"] = interleaved(ts, model, "predictions", args.rounds, args.warmup)
        result["throughput"] = throughput(ts, model, args.seconds, args.threads, 10, args.cycles)
        result["writes"] = writes(ts, f"{model.name}_on")
    result["trail"] = trail_check(f"sqlite://{work / 'trails' / model.name}.db", result["explanations"].pop("ids"))
    result["predictions"].pop("ids")
    result["environment"]["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit_cost.json").write_text(json.dumps(result, indent=2))
    (out / "audit_cost.md").write_text(markdown(result))
    print(markdown(result))
    ok = result["trail"]["verified"] and result["trail"]["answered_ids_missing"] == 0 and result["writes"]["lost"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
