"""Records per second that one SQLite audit sink sustains, driven directly (no TorchServe).

Each scenario starts ``writers`` processes (as many TorchServe workers) on one fresh
SQLite file; each opens an ``AuditTrail`` and calls ``record()`` with batches of
``batch`` entries, back to back, for ``--seconds``. Reported: committed records per
second (all writers together), the latency of one ``record()`` call (p50, p99) and
the stored body size; afterwards every chain is verified and the records counted
against the ids the writers got back.

Records are realistic in size: ``resnet50`` is a Grad-CAM answer of ResNet-50 (7x7
heatmap at 3 decimals, top-5 of 1,000 ImageNet-style labels, a 110 kB JPEG-sized
input hashed); ``shapes`` the demo's (8x8 heatmap, 6 labels, a 5 kB PNG); ``text`` a
Layer IG answer of 64 tokens and 64 words with full-precision attributions (350-byte
input). ``keep`` scenarios keep the input bytes in the trail.

Usage: python -m benchmarks.audit_sink [--seconds 5] [--quick] [--out build/bench/audit_sink]
Writes ``<out>.json`` and ``<out>.md``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tsexplain.serving.audit import AuditEntry, AuditSettings, AuditTrail, open_store  # noqa: E402

INPUT_BYTES = {"resnet50": 110_000, "shapes": 5_000, "text": 350}


def make_entry(kind: str, k: int, rng: random.Random) -> AuditEntry:
    data = rng.randbytes(INPUT_BYTES[kind])
    if kind == "text":
        tokens = [{"token": f"tok{i}", "start": 6 * i, "end": 6 * i + 5, "attribution": rng.uniform(-2, 2)}
                  for i in range(64)]
        words = [{"word": f"word{i}", "start": 6 * i, "end": 6 * i + 5, "attribution": rng.uniform(-2, 2)}
                 for i in range(64)]
        return AuditEntry(
            route="explanations", method="layer_ig", target={"index": 1, "label": "positive"},
            parameters={"n_steps": 50, "layer": "bert.embeddings.word_embeddings", "baseline": "pad",
                        "precision": "fp32", "integration": "gausslegendre"},
            predictions=[{"index": 1, "label": "positive", "probability": rng.random()},
                         {"index": 0, "label": "negative", "probability": rng.random()}],
            explanation={"method": "layer_ig", "target": {"index": 1, "label": "positive"}, "contrast": None,
                         "layer": "bert.embeddings.word_embeddings", "n_steps": 50, "integration": "gausslegendre",
                         "tokens": tokens, "words": words,
                         "top_words": sorted(words, key=lambda w: -abs(w["attribution"]))[:5],
                         "convergence_delta": {"absolute": rng.random() * 1e-4, "relative": rng.random() * 1e-5},
                         "truncated": False, "precision": "fp32", "converged": None, "cached": False,
                         "elapsed_ms": 204.9},
            input_bytes=data, content_type="text/plain", elapsed_ms=204.9, priority="audit", caller="team-a",
            request_id=f"req-{k}")
    side, classes = (7, 1000) if kind == "resnet50" else (8, 6)
    label = lambda i: f"class_{i}_label" if kind == "resnet50" else ["circle", "square", "triangle", "star", "cross", "ring"][i]  # noqa: E731
    top = sorted(rng.sample(range(classes), 5))
    predictions = [{"index": i, "label": label(i), "probability": rng.random()} for i in top]
    values = [[round(rng.random(), 3) for _ in range(side)] for _ in range(side)]
    return AuditEntry(
        route="explanations", method="gradcam", target={"index": top[0], "label": label(top[0])},
        parameters={"layer": "layer4" if kind == "resnet50" else "layer2", "heatmap_size": "feature",
                    "outputs": ["heatmap"], "resize": 256 if kind == "resnet50" else 64,
                    "crop": 224 if kind == "resnet50" else 64, "overlay_alpha": 0.6},
        predictions=predictions,
        explanation={"method": "gradcam", "target": {"index": top[0], "label": label(top[0])}, "contrast": None,
                     "layer": "layer4", "heatmap": {"shape": [side, side], "values": values}, "cached": False,
                     "elapsed_ms": 48.2},
        input_bytes=data, content_type="image/jpeg", elapsed_ms=48.2, priority="audit", caller="team-a",
        request_id=f"req-{k}")


def writer(sink: str, kind: str, batch: int, seconds: float, start_at: float, keep: bool, synchronous: str, queue) -> None:
    try:
        _write(sink, kind, batch, seconds, start_at, keep, synchronous, queue)
    except BaseException as exc:  # noqa: BLE001 - the parent reports it instead of waiting for a result
        queue.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


def _write(sink: str, kind: str, batch: int, seconds: float, start_at: float, keep: bool, synchronous: str,
           queue) -> None:
    rng = random.Random(os.getpid())
    entries = [make_entry(kind, k, rng) for k in range(64)]  # built beforehand: the sink is measured, not this
    settings = AuditSettings(record="all", sink=sink, keep_input=keep, max_input_bytes=1 << 20,
                             sqlite_synchronous=synchronous, timeout_ms=30_000)
    trail = AuditTrail.open(settings, model_name=kind, model_version="1", mar_sha256="ab" * 32)
    while time.time() < start_at:
        time.sleep(0.001)
    latencies, ids, k = [], [], 0
    stop = time.perf_counter() + seconds
    began = time.perf_counter()
    while time.perf_counter() < stop:
        chunk = [entries[(k + i) % len(entries)] for i in range(batch)]
        t0 = time.perf_counter()
        got = trail.record(chunk)
        latencies.append((time.perf_counter() - t0) * 1000)
        ids.extend(got)
        k += batch
    elapsed = time.perf_counter() - began
    trail.close()
    queue.put({"records": len(ids), "elapsed_s": elapsed, "latencies_ms": latencies,
               "lost": sum(1 for i in ids if i is None)})


def scenario(kind: str, writers: int, batch: int, synchronous: str, keep: bool, seconds: float) -> dict:
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="audit-bench-", dir=os.environ.get("AUDIT_BENCH_DIR")) as folder:
        sink = f"sqlite://{folder}/audit.db"
        queue = context.Queue()
        start_at = time.time() + 2.0 + 0.5 * writers  # after every process has imported and opened the trail
        processes = [context.Process(target=writer, args=(sink, kind, batch, seconds, start_at, keep, synchronous, queue))
                     for _ in range(writers)]
        for p in processes:
            p.start()
        results = [queue.get(timeout=seconds + 120) for _ in processes]
        for p in processes:
            p.join()
        failed = [r["error"] for r in results if "error" in r]
        if failed:
            raise RuntimeError(f"{len(failed)} writer(s) failed: {failed[0]}")
        store = open_store(sink, create=False)
        report, _ = store.verify()
        store.close()
        with sqlite3.connect(f"{folder}/audit.db") as db:
            body_bytes = db.execute("SELECT AVG(LENGTH(CAST(body AS BLOB))) FROM audit_records").fetchone()[0]
        size_mb = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 1e6
    latencies = sorted(x for r in results for x in r["latencies_ms"])
    records = sum(r["records"] for r in results)
    span = max(r["elapsed_s"] for r in results)
    return {
        "kind": kind, "writers": writers, "batch": batch, "synchronous": synchronous, "keep_input": keep,
        "records": records, "records_per_s": round(records / span, 1),
        "record_ms_p50": round(statistics.median(latencies), 3),
        "record_ms_p99": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
        "body_bytes": round(body_bytes or 0), "file_mb": round(size_mb, 2),
        "verified": report.ok and report.records == records, "lost": sum(r["lost"] for r in results),
    }


def scenarios(quick: bool) -> list[tuple]:
    if quick:
        return [("shapes", 1, 1, "full", False), ("text", 2, 4, "normal", False)]
    out = []
    for synchronous in ("full", "normal"):
        for kind in ("resnet50", "shapes", "text"):
            for batch in (1, 8):
                out.append((kind, 1, batch, synchronous, False))
    for writers in (2, 4):
        for batch in (1, 8):
            out.append(("resnet50", writers, batch, "full", False))
    out.append(("resnet50", 1, 1, "full", True))
    out.append(("resnet50", 4, 8, "full", True))
    return out


def machine() -> dict:
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version, "platform": platform.platform(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine()}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"Audit sink (SQLite), {m['date']}, {m['cpus']} CPUs, {m['platform']}, SQLite {m['sqlite']}, "
             f"{result['seconds']} s per scenario", "",
             "| record | writers | batch | synchronous | keep input | records/s | record() p50 ms | p99 ms | body bytes | verified |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["scenarios"]:
        lines.append(f"| {r['kind']} | {r['writers']} | {r['batch']} | {r['synchronous']} | "
                     f"{'yes' if r['keep_input'] else 'no'} | {r['records_per_s']:.0f} | {r['record_ms_p50']:.2f} | "
                     f"{r['record_ms_p99']:.2f} | {r['body_bytes']} | {'yes' if r['verified'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="two short scenarios (the test suite's check)")
    parser.add_argument("--out", default=str(ROOT / "build" / "bench" / "audit_sink"))
    args = parser.parse_args(argv)
    seconds = 0.5 if args.quick else args.seconds
    result = {"machine": machine(), "seconds": seconds, "scenarios": []}
    for spec in scenarios(args.quick):
        row = scenario(*spec, seconds=seconds)
        result["scenarios"].append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0 if all(r["verified"] and not r["lost"] for r in result["scenarios"]) else 1


if __name__ == "__main__":
    sys.exit(main())
