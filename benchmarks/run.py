"""Benchmarks of the explainer handlers against TorchServe's stock handlers, through a real TorchServe.

For each model, one TorchServe on loopback serves our handler and the stock one on the same weights
(see benchmarks/models.py), and the client drives, each scenario bounded by a request count and a
wall-time limit:

- ``sequential``: one client, batch size 1, /predictions and /explanations of both handlers,
  interleaved request by request (so that background load hits all four alike): p50/p90/p99 latency
  and response bytes;
- ``throughput``: several client threads sending /predictions to the batching variants, stock and
  ours in ABBA order: requests per second;
- ``under_load``: our batching variant, prediction-only against 10% of the requests explained
  (priority header and explanation token; ``policy: priority``), the explained phase twice: served
  synchronously (``<name>_b8``, the default) and on ``<name>_async`` (``asyncCommunication: true``:
  the worker batches itself and explains in a lane of its own), phases in ABCCBA order (run
  ``load_rounds`` times, so that background load falls on all three alike). First closed-loop
  (several client threads, each sending its next request when answered), then open-loop (requests
  sent at a fixed Poisson rate, the same arrival times in every phase, from a pool of threads;
  latency counted from the scheduled send time): the rate is ``OPEN_LOOP_SHARE`` of the slower
  closed-loop explained phase's throughput, so that the offered load stays within what the worker
  can serve. /predictions p50/p99 in each phase; every /predictions answer compared with the same
  input's answer alone (labels in the same order; probabilities within a tolerance set from the
  prediction-only phase's own batching noise); from the workers' log (the handler's ``batch
  size=.. explained=.. answered_early=..`` line), how many batches mixed predictions with
  explanations and how many of their rows were answered before the explanation work.

Writes ``results.json``, ``results.md`` (the tables of docs/performance.md) and ``results.png``.
The device is TorchServe's: its GPU when the machine has one, else the CPU.

    python -m benchmarks.run [--quick] [--models shapes,reviews,resnet50,bert-base] [--out DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import random
import re
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import models as bench_models
from benchmarks import report
from tsexplain.tools.launcher import TorchServe

ROOT = Path(__file__).resolve().parent.parent
EXPLAIN_TOKEN = "bench-explain-token"
EXPLAIN_HEADERS = {"X-Priority": "high", "X-Explain-Token": EXPLAIN_TOKEN}
EXPLAINED_SHARE = 10  # every 10th request of the mixed load is explained
OPEN_LOOP_SHARE = 0.65  # open-loop rate: this share of the closed-loop explained phases' throughput
OPEN_LOOP_POOL = 64  # client threads of the open-loop phases (at most this many requests outstanding)


@dataclass(frozen=True)
class Budget:
    """Bounds of one measurement: at most ``requests`` requests and ``seconds`` of wall time."""

    requests: int
    seconds: float

    def scaled(self, factor: float) -> "Budget":
        return Budget(max(1, int(self.requests * factor)), self.seconds)


@dataclass(frozen=True)
class Plan:
    warmup: int
    predict: Budget  # sequential /predictions, each handler
    explain: Budget  # sequential /explanations, ours
    stock_explain: Budget  # sequential /explanations, stock
    throughput: Budget  # concurrent /predictions, each handler (split in two halves)
    load: Budget  # concurrent load, each phase (split in 2 x load_rounds slices)
    threads: int
    load_rounds: int = 1  # under_load runs its ABCDDCBA order this many times (background load spreads evenly)
    throughput_cycles: int = 1  # throughput runs its ABBA order this many times
    throughput_warmup_cycles: int = 0  # and this many more before them, reported but not counted


# Small enough for ~15 minutes on 2 CPU cores for all four models (quick: a smoke test).
PLANS = {
    "quick": {"small": Plan(2, Budget(6, 20), Budget(6, 20), Budget(2, 30), Budget(16, 20), Budget(20, 30), 4)},
    # throughput: 3 ABBA cycles of phases long enough for tens of batches (a phase of 100 shapes requests
    # lasted 0.6 s, of 24 ResNet-50 requests 3 batches: ratios from those moved by +-0.1 between runs)
    "cpu": {"small": Plan(5, Budget(100, 30), Budget(100, 30), Budget(20, 30), Budget(4800, 60), Budget(300, 30), 8,
                          load_rounds=3, throughput_cycles=3, throughput_warmup_cycles=1),
            "resnet50": Plan(3, Budget(25, 30), Budget(25, 30), Budget(3, 60), Budget(480, 90), Budget(60, 40), 8,
                             throughput_cycles=3, throughput_warmup_cycles=1),
            "bert-base": Plan(2, Budget(20, 30), Budget(3, 60), Budget(3, 60), Budget(240, 90), Budget(40, 40), 8,
                              throughput_cycles=3, throughput_warmup_cycles=1)},
    # Aimed at the device tool's 10-minute command limit for resnet50 and bert-base together (not yet run
    # with the eight under_load phases; if it runs over, give benchmarks/gpu/run.sh one model per call).
    "gpu": {"small": Plan(20, Budget(300, 15), Budget(300, 15), Budget(50, 25), Budget(2000, 15), Budget(2000, 12), 16),
            "resnet50": Plan(20, Budget(300, 15), Budget(300, 15), Budget(30, 25), Budget(2000, 15), Budget(2000, 12), 16),
            "bert-base": Plan(10, Budget(300, 15), Budget(100, 15), Budget(30, 25), Budget(2000, 15), Budget(1000, 12), 16)}}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def summary(latencies: list[float], sizes: list[int], errors: int = 0) -> dict:
    return {"n": len(latencies), "errors": errors,
            "p50_ms": round(percentile(latencies, 50), 3), "p90_ms": round(percentile(latencies, 90), 3),
            "p99_ms": round(percentile(latencies, 99), 3),
            "mean_ms": round(statistics.fmean(latencies), 3) if latencies else float("nan"),
            "bytes_mean": round(statistics.fmean(sizes)) if sizes else 0, "bytes_max": max(sizes, default=0)}


class Client:
    """Timed calls through ``TorchServe.request`` (http.client, exact headers, inference token)."""

    def __init__(self, ts: TorchServe, model: bench_models.Model):
        self.ts, self.model = ts, model

    def call(self, variant: str, route: str, i: int, stock: bool) -> tuple[int, bytes, float]:
        explain = route == "explanations"
        body, content_type = self.model.body(i, stock, explain)
        headers = {"Content-Type": content_type, **(EXPLAIN_HEADERS if explain and not stock else {})}
        began = time.perf_counter()
        status, answer = self.ts.request("POST", f"{self.ts.inference_url}/{route}/{variant}", body, headers,
                                         timeout=600)
        return status, answer, (time.perf_counter() - began) * 1000


def relative_delta(body: bytes) -> float | None:
    try:
        return json.loads(body)["explanation"]["convergence_delta"]["relative"]
    except (ValueError, KeyError, TypeError):
        return None


def sequential(client: Client, plan: Plan) -> dict:
    """Batch-1 latency and response size of both handlers' two routes, interleaved."""
    name = client.model.name
    combos = {"ours/predictions": (name, "predictions", False, plan.predict),
              "stock/predictions": (f"{name}_stock", "predictions", True, plan.predict),
              "ours/explanations": (name, "explanations", False, plan.explain),
              "stock/explanations": (f"{name}_stock", "explanations", True, plan.stock_explain)}
    for variant, route, stock, _ in combos.values():
        for i in range(plan.warmup if route == "predictions" or not stock else 1):
            client.call(variant, route, i, stock)
    records = {key: {"lat": [], "size": [], "errors": 0, "spent": 0.0} for key in combos}
    deltas: list[float] = []
    i = 0
    while True:
        active = [k for k, (_, _, _, budget) in combos.items()
                  if len(records[k]["lat"]) + records[k]["errors"] < budget.requests
                  and records[k]["spent"] < budget.seconds]
        if not active:
            break
        for key in active:
            variant, route, stock, _ = combos[key]
            status, body, ms = client.call(variant, route, i, stock)
            rec = records[key]
            rec["spent"] += ms / 1000
            if status != 200:
                rec["errors"] += 1
                continue
            rec["lat"].append(ms)
            rec["size"].append(len(body))
            if key == "ours/explanations" and client.model.kind == "text":
                delta = relative_delta(body)
                if delta is not None:
                    deltas.append(delta)
        i += 1
    out = {key: summary(r["lat"], r["size"], r["errors"]) for key, r in records.items()}
    if deltas:
        out["convergence"] = {"n": len(deltas), "share_le_0.05": round(sum(d <= 0.05 for d in deltas) / len(deltas), 4),
                              "median_relative_delta": statistics.median(deltas), "max_relative_delta": max(deltas)}
    return out


def concurrent(job, threads: int, budget: Budget) -> tuple[list, float]:
    """Run ``job(i)`` from ``threads`` threads for indices 0.. until ``budget`` is spent.

    Returns the job results (in completion order) and the wall time in seconds.
    """
    lock, results, counter = threading.Lock(), [], iter(range(budget.requests))
    deadline = time.monotonic() + budget.seconds

    def worker():
        while time.monotonic() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            result = job(i)
            with lock:
                results.append(result)

    began = time.perf_counter()
    run_threads(worker, threads)
    return results, time.perf_counter() - began


def run_threads(worker, threads: int) -> None:
    """Run ``worker`` on ``threads`` threads and wait for all of them."""
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()


def throughput(client: Client, plan: Plan) -> dict:
    """Concurrent /predictions, stock and ours in ABBA order on the batching variants, the ABBA
    repeated ``plan.throughput_cycles`` times (background load falls on both sides alike); the
    ratio from all timed phases together, and each cycle's ratio to show the spread.

    First a warm-up from all threads, so that both workers have run full batches (one request at
    a time warms only batches of 1), then ``plan.throughput_warmup_cycles`` whole cycles that are
    reported but not counted: the frontend's JVM keeps speeding up for thousands of requests (a
    shapes phase went from 145 to 240 req/s over 24 phases), and a cycle run on that slope
    favours the side that runs second (1.09 on shapes, up to 1.4 with the one-at-a-time warm-up).
    """
    name = client.model.name
    half = plan.throughput.scaled(0.5 / plan.throughput_cycles)
    for variant, stock in ((f"{name}_stock_b8", True), (f"{name}_b8", False)):
        concurrent(lambda i: client.call(variant, "predictions", i, stock), plan.threads,
                   Budget(plan.threads * plan.warmup, 120))
    totals = {"stock": [0, 0.0, 0], "ours": [0, 0.0, 0]}  # ok, seconds, errors (timed cycles)
    cycles, phases = [], []
    for number in range(plan.throughput_warmup_cycles + plan.throughput_cycles):
        timed = number >= plan.throughput_warmup_cycles
        cycle = {"stock": [0, 0.0], "ours": [0, 0.0]}
        for side in ("stock", "ours", "ours", "stock"):
            variant, stock = (f"{name}_stock_b8", True) if side == "stock" else (f"{name}_b8", False)
            results, wall = concurrent(lambda i: client.call(variant, "predictions", i, stock)[0], plan.threads, half)
            ok = sum(status == 200 for status in results)
            totals[side][2] += len(results) - ok  # an error counts, timed or not
            cycle[side][0] += ok
            cycle[side][1] += wall
            phases.append([side, round(ok / wall, 3) if wall else 0.0, timed])
        if timed:
            for side, (ok, sec) in cycle.items():
                totals[side][0] += ok
                totals[side][1] += sec
        rps = {side: ok / sec if sec else 0.0 for side, (ok, sec) in cycle.items()}
        cycles.append(round(rps["ours"] / rps["stock"], 4) if rps["stock"] else None)
    out = {side: {"requests": ok, "seconds": round(sec, 3), "errors": err, "rps": round(ok / sec, 3) if sec else 0.0}
           for side, (ok, sec, err) in totals.items()}
    out["threads"] = plan.threads
    out["ratio_ours_vs_stock"] = round(out["ours"]["rps"] / out["stock"]["rps"], 4) if out["stock"]["rps"] else None
    out["warmup_cycle_ratios"] = cycles[:plan.throughput_warmup_cycles]
    out["cycle_ratios"] = cycles[plan.throughput_warmup_cycles:]
    out["phase_rps"] = phases  # [side, requests per second, timed] in the order run
    return out


def prediction_difference(answer: dict, reference: dict) -> tuple[bool, float]:
    """(same labels in the same order, largest probability difference)."""
    if list(answer) != list(reference):
        return False, float("inf")
    return True, max(abs(answer[k] - reference[k]) for k in reference)


BATCH_LINE = re.compile(r"W-\d+-(?P<model>\S+)_[^_\s]+-stdout MODEL_LOG - "
                        r"batch size=(?P<size>\d+) explained=(?P<explained>\d+) answered_early=(?P<early>\d+)")
EXPLANATION_LINE = re.compile(r"W-\d+-(?P<model>\S+)_[^_\s]+-stdout MODEL_LOG - explanation method=\S+ .*"
                              r"elapsed_ms=(?P<ms>[\d.]+)")


class BatchLog:
    """The handler's per-batch log lines (``batch size=.. explained=.. answered_early=..``) of one
    phase: ``mark()`` before it, ``batches(...)`` after it."""

    def __init__(self, ts: TorchServe):
        self.path = ts.workdir / "logs" / "model_log.log"

    def mark(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def batches(self, since: int, model: str, requests: int, wait: float = 5.0) -> dict:
        """Counts over ``model``'s batches logged after ``since``, waiting up to ``wait`` s for
        the lines of all ``requests`` (the frontend writes the workers' output asynchronously)."""
        deadline = time.monotonic() + wait
        while True:
            with open(self.path, "rb") as log:
                log.seek(since)
                text = log.read().decode(errors="replace")
            rows = [(int(m["size"]), int(m["explained"]), int(m["early"])) for m in BATCH_LINE.finditer(text)
                    if m["model"] == model]
            if sum(size for size, _, _ in rows) >= requests or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        mixed = [(size, explained, early) for size, explained, early in rows if 0 < explained < size]
        return {"batches": len(rows), "requests": sum(size for size, _, _ in rows), "complete": sum(
                    size for size, _, _ in rows) >= requests, "mixed_batches": len(mixed),
                "not_explained_in_mixed": sum(size - explained for size, explained, _ in mixed),
                "answered_early": sum(early for _, _, early in rows),
                "explanation_ms": [float(m["ms"]) for m in EXPLANATION_LINE.finditer(text) if m["model"] == model]}


def open_loop(job, rate: float, threads: int, budget: Budget, seed: int = 0) -> tuple[list, float]:
    """Send ``job(i)`` at Poisson arrival times of ``rate`` per second (the same times for the same
    seed) from ``threads`` threads, until ``budget`` is spent.

    Returns ``(result, late_ms)`` pairs (in completion order), ``late_ms`` being how long after its
    scheduled time the request went out (no free thread), and the wall time in seconds.
    """
    rng, times, t = random.Random(seed), [], 0.0
    while len(times) < budget.requests:
        t += rng.expovariate(rate)
        if t > budget.seconds:
            break
        times.append(t)
    lock, results, counter = threading.Lock(), [], iter(range(len(times)))
    start = time.perf_counter() + 0.05

    def worker():
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            due = start + times[i]
            if due > time.perf_counter():
                time.sleep(due - time.perf_counter())
            late_ms = max(0.0, (time.perf_counter() - due) * 1000)
            result = job(i)
            with lock:
                results.append((result, late_ms))

    run_threads(worker, threads)
    return results, time.perf_counter() - start


# with_explanations: served synchronously; with_explanations_async: the asyncCommunication variant
PHASES = ("predictions_only", "with_explanations", "with_explanations_async")
PHASE_ORDER = PHASES + PHASES[::-1]  # ABCCBA, each phase in two slices (per round)


def _load_phases(client: Client, variants: dict, references: dict, run_slice, log: BatchLog, rounds: int) -> dict:
    """Run ``PHASE_ORDER`` ``rounds`` times; ``run_slice(job)`` runs one slice and returns ``(result,
    late_ms)`` pairs and its wall time. Returns per-phase records."""
    def job(variant, mixed):
        def run(i):
            route = "explanations" if mixed and i % EXPLAINED_SHARE == EXPLAINED_SHARE - 1 else "predictions"
            status, body, ms = client.call(variant, route, i, False)
            return route, i, status, body, ms
        return run

    records = {phase: {"lat": [], "diff": [], "labels_differ": 0, "errors": 0, "explained": [], "not_explained": 0,
                       "late": [], "ok": 0, "seconds": 0.0, "batches": [], "load": []} for phase in PHASES}
    for phase in PHASE_ORDER * rounds:
        rec = records[phase]
        mark = log.mark()
        results, wall = run_slice(job(variants[phase], phase != "predictions_only"))
        rec["seconds"] += wall
        for (route, i, status, body, ms), late_ms in results:
            rec["late"].append(late_ms)
            ms += late_ms  # open loop: from the scheduled time
            if status != 200:
                rec["errors"] += 1
                continue
            rec["ok"] += 1
            if route == "explanations":
                rec["explained"].append(ms)
                rec["not_explained"] += json.loads(body).get("explanation") is None
            else:
                rec["lat"].append(ms)
                same, diff = prediction_difference(json.loads(body), references[i % len(client.model.inputs)])
                rec["labels_differ"] += not same
                rec["diff"].append(diff if same else 0.0)
        rec["batches"].append(log.batches(mark, variants[phase], sum(r[0][2] == 200 for r in results)))
        rec["load"].append(round(os.getloadavg()[0], 2))  # other jobs on the machine show here
    return records


def _summarise_phases(records: dict, timed_sends: bool = False) -> dict:
    out = {}
    for phase, rec in records.items():
        out[phase] = {**summary(rec["lat"], [], rec["errors"]), "labels_differ": rec["labels_differ"],
                      "max_probability_difference": max(rec["diff"], default=0.0),
                      "rps": round(rec["ok"] / rec["seconds"], 3) if rec["seconds"] else 0.0}
        if timed_sends:
            out[phase]["sent_late_over_10ms"] = sum(late > 10 for late in rec["late"])
            out[phase]["max_late_ms"] = round(max(rec["late"], default=0.0), 3)
        if phase != "predictions_only":
            out[phase]["explained"] = summary(rec["explained"], [])
            out[phase]["explanations_not_computed"] = rec["not_explained"]
        halves = rec["batches"]
        work = [ms for h in halves for ms in h.pop("explanation_ms")]  # the handler's own timing of each
        out[phase]["batches"] = {key: all(h[key] for h in halves) if key == "complete" else sum(h[key] for h in halves)
                                 for key in halves[0]}
        if work:
            out[phase]["explanation_work_ms"] = {"n": len(work), "p50": round(percentile(work, 50), 3),
                                                 "max": round(max(work), 3)}
        out[phase]["load_average_1min"] = rec["load"]  # after each slice
    noise = out["predictions_only"]["max_probability_difference"]
    out["tolerance"] = tolerance = max(2 * noise, 1e-6)
    base = out["predictions_only"]
    for phase, suffix in (("with_explanations", ""), ("with_explanations_async", "_async")):
        mixed = out[phase]
        out["answers_unchanged" + suffix] = (mixed["labels_differ"] == 0 and base["labels_differ"] == 0
                                             and mixed["max_probability_difference"] <= tolerance
                                             and mixed["errors"] == 0)
        out["ratio_p99" + suffix] = round(mixed["p99_ms"] / base["p99_ms"], 4) if base["p99_ms"] else None
        out["ratio_p50" + suffix] = round(mixed["p50_ms"] / base["p50_ms"], 4) if base["p50_ms"] else None
    return out


def under_load(client: Client, plan: Plan) -> dict:
    """/predictions under prediction-only load and with 10% of the requests explained (ours), served
    synchronously and concurrently (asyncCommunication); closed-loop, then open-loop."""
    on, lanes = f"{client.model.name}_b8", client.model.concurrent
    variants = {"predictions_only": on, "with_explanations": on, "with_explanations_async": lanes}
    references = {}
    for i in range(len(client.model.inputs)):  # each input alone (a batch of one)
        status, body, _ = client.call(on, "predictions", i, False)
        references[i] = json.loads(body)
    for i in range(plan.warmup):  # these workers have served nothing yet
        client.call(lanes, "predictions", i, False)
    for variant in (on, lanes):
        client.call(variant, "explanations", 0, False)
    rounds = plan.load_rounds
    log, part = BatchLog(client.ts), Budget(max(1, plan.load.requests // (2 * rounds)), plan.load.seconds / rounds)

    def closed_slice(job):
        results, wall = concurrent(job, plan.threads, part)
        return [(r, 0.0) for r in results], wall

    out = _summarise_phases(_load_phases(client, variants, references, closed_slice, log, rounds))
    out["threads"], out["rounds"] = plan.threads, rounds

    mixed_rps = min(out["with_explanations"]["rps"], out["with_explanations_async"]["rps"])
    rate = round(OPEN_LOOP_SHARE * mixed_rps, 2)
    if rate > 0:
        def open_slice(job):
            return open_loop(job, rate, OPEN_LOOP_POOL, part)

        opened = _summarise_phases(_load_phases(client, variants, references, open_slice, log, rounds),
                                   timed_sends=True)
        out["open_loop"] = {**opened, "rate_rps": rate, "pool_threads": OPEN_LOOP_POOL,
                            "rate_basis": f"{OPEN_LOOP_SHARE:g} x {mixed_rps:g} req/s, the slower closed-loop "
                                          "explained phase's throughput",
                            "prediction_only_closed_loop_rps": out["predictions_only"]["rps"]}
    return out


def targets(model: bench_models.Model, result: dict) -> list[dict]:
    """The targets of issues #4 and #5, measured."""
    seq, rows = result["sequential"], []

    def row(target, value, threshold, comparison, note=""):
        ok = value is not None and (value <= threshold if comparison == "<=" else value >= threshold)
        rows.append({"model": model.name, "target": target, "value": value, "threshold": threshold,
                     "comparison": comparison, "met": bool(ok), "note": note})

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    ours_pred, ours_expl = seq["ours/predictions"]["p50_ms"], seq["ours/explanations"]["p50_ms"]
    if model.kind == "image":
        row("Grad-CAM /explanations p50 ÷ /predictions p50 (ours, batch 1)", ratio(ours_expl, ours_pred), 1.2, "<=")
        row("stock /explanations p50 ÷ ours (batch 1)", ratio(seq["stock/explanations"]["p50_ms"], ours_expl), 10, ">=")
        row("explanation response bytes, no overlay (max)", seq["ours/explanations"]["bytes_max"], 20_000, "<=")
    else:
        row("LIG /explanations p50 ÷ /predictions p50 (ours, batch 1)", ratio(ours_expl, ours_pred), 4, "<=",
            f"{model.tokens} tokens")
        conv = seq.get("convergence", {})
        row("share of explanations with relative convergence delta ≤ 0.05", conv.get("share_le_0.05"), 0.95, ">=",
            f"{conv.get('n', 0)} explanations")
    tp = result["throughput"]
    row("/predictions throughput, ours ÷ stock (concurrent, batching)", tp["ratio_ours_vs_stock"], 0.97, ">=",
        f"{tp['threads']} client threads")
    load = result["under_load"]
    row("/predictions p99 with 10% explained ÷ prediction-only p99", load["ratio_p99"], 1.5, "<=",
        f"{load['threads']} client threads")
    if "ratio_p99_async" in load:
        row("the same, served with asyncCommunication (explanations in a lane of their own)",
            load["ratio_p99_async"], 1.5, "<=", f"{load['threads']} client threads")
    rows.append({"model": model.name, "target": "/predictions answers unchanged beside explanations (labels equal, "
                 "probabilities within tolerance)", "value": load["with_explanations"]["max_probability_difference"],
                 "threshold": load["tolerance"], "comparison": "<=", "met": bool(load["answers_unchanged"]),
                 "note": f"labels differ: {load['with_explanations']['labels_differ']}"})
    return rows


def environment(profile: str) -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    import importlib.metadata as md

    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "profile": profile, "device": f"cuda ({gpu})" if gpu else "cpu", "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
            "torchserve": md.version("torchserve"), "captum": md.version("captum"),
            "transformers": md.version("transformers"),
            "load_average_1min_at_start": round(os.getloadavg()[0], 2)}  # other jobs on the machine


def run_model(name: str, profile: str, work: Path, warmup: int | None = None) -> dict:
    plans = PLANS[profile]
    plan = plans.get(name, plans["small"])
    if warmup is not None:
        plan = dataclasses.replace(plan, warmup=warmup)
    store = work / "store"
    began = time.perf_counter()
    model = bench_models.BUILDERS[name](store, n_inputs=8)
    print(f"[bench] {name}: staged in {time.perf_counter() - began:.0f}s", flush=True)
    env = {bench_models.EXPLAIN_TOKEN_ENV: EXPLAIN_TOKEN}
    properties = {"max_response_size": str(64 << 20), "max_request_size": str(64 << 20),
                  "default_response_timeout": "600"}
    began = time.perf_counter()
    with TorchServe(store, model.variants(), work / f"ts-{name}", properties=properties, env=env) as ts:
        print(f"[bench] {name}: TorchServe ready in {time.perf_counter() - began:.0f}s", flush=True)
        client = Client(ts, model)
        result = {"description": model.description, "kind": model.kind, "plan": plan.__dict__ | {
            k: v.__dict__ for k, v in plan.__dict__.items() if isinstance(v, Budget)}}
        for scenario, function in (("sequential", sequential), ("throughput", throughput), ("under_load", under_load)):
            began = time.perf_counter()
            result[scenario] = function(client, plan)
            print(f"[bench] {name}: {scenario} in {time.perf_counter() - began:.0f}s", flush=True)
    result["targets"] = targets(model, result)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few requests per scenario (smoke test)")
    parser.add_argument("--profile", choices=sorted(PLANS), help="request budgets (default: gpu with CUDA, else cpu)")
    parser.add_argument("--models", default=None, help="comma-separated: shapes,reviews,resnet50,bert-base "
                        "(default: all; --quick: shapes,reviews)")
    parser.add_argument("--out", default=str(ROOT / "build" / "bench"), help="where results.* go")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up requests per route (default: the profile's)")
    parser.add_argument("--workdir", default=None, help="model store and TorchServe dirs (default: a temp dir)")
    args = parser.parse_args(argv)
    import torch

    profile = "quick" if args.quick else args.profile or ("gpu" if torch.cuda.is_available() else "cpu")
    names = (args.models or ("shapes,reviews" if args.quick else ",".join(bench_models.BUILDERS))).split(",")
    unknown = set(names) - set(bench_models.BUILDERS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; known: {list(bench_models.BUILDERS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="tsexplain-bench-"))
    results = {"environment": environment(profile), "models": {}}
    began = time.perf_counter()
    for name in names:
        results["models"][name] = run_model(name, profile, work, args.warmup)
    results["environment"]["seconds"] = round(time.perf_counter() - began, 1)
    results["environment"]["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    results["targets"] = [row for r in results["models"].values() for row in r["targets"]]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(report.markdown(results))
    try:
        report.chart(results, out / "results.png")
    except ImportError:  # a GPU machine without matplotlib: draw it later with python -m benchmarks.report
        print("[bench] matplotlib missing: no results.png (python -m benchmarks.report results.json draws it)")
    print(f"[bench] wrote {out / 'results.json'}, results.md, results.png in {results['environment']['seconds']}s")
    return results


if __name__ == "__main__":
    main()
