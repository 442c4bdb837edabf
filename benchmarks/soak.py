"""Soak test: bounded mixed load on loopback through a real TorchServe, with locust.

Serves the demo models (``shapes``: image, Grad-CAM, policy all; ``reviews``:
text, Layer IG, policy priority with an explanation token) and ``faulty`` (the
shapes MAR with ``explain.inject_fault: error``, so its explanations answer 503
on purpose). After a warm-up, runs locust headless (``benchmarks/soak_locustfile.py``)
for ``--duration`` seconds with ``--users`` clients, while sampling the workers'
resident memory (RSS, and CUDA memory where ``nvidia-smi`` is present). Then
checks that every answer had its expected status (the only 5xx are the injected
ones), that every worker is READY with the PID it had after warm-up, and writes
``soak.json`` and ``soak.md`` into ``--out``.

With ``--audit`` the audit trail is on for ``shapes`` and ``reviews`` (``record: all``, one
SQLite file for both, the defaults otherwise): the results then say how many records the sink
took, at what rate, how long its commits took (from the workers' log lines) and how busy that
kept it, and whether the trail verifies.

Usage: python -m benchmarks.soak --duration 300 --users 8 --out build/soak [--audit]
Exit status 0 when every check passed, 1 otherwise. Sends traffic to 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from tsexplain.tools.launcher import TorchServe  # noqa: E402

MODELS = {"shapes": "shapes.mar", "reviews": "reviews.mar", "faulty": "shapes.mar"}
LOCUSTFILE = Path(__file__).resolve().parent / "soak_locustfile.py"
MIB = 1 << 20
AUDIT_LINE = re.compile(r"audit records written=(\d+) lost=(\d+) write_ms=([\d.]+)")


def build_demo_store(store: Path) -> Path:
    """The demo MARs (shapes, reviews) built from the current code into ``store``."""
    import build_mar

    build_mar.main(["demo", "--export-path", str(store)])
    return store


def write_payloads(folder: Path) -> Path:
    """A held-out shapes image and a synthetic review for the load."""
    import io

    from tsexplain.tools.synthetic import reviews, shapes

    folder.mkdir(parents=True, exist_ok=True)
    size = json.loads((ROOT / "build/demo/shapes/training.json").read_text())["image_size"]
    buffer = io.BytesIO()
    shapes.generate(1, 4242, size)[0].image.save(buffer, format="PNG")
    (folder / "image.png").write_bytes(buffer.getvalue())
    (folder / "review.txt").write_text(reviews.generate(1, 4242)[0].text)
    return folder


def workers(server: TorchServe) -> dict[str, list[dict]]:
    """{model: [{pid, status}]} from the management API."""
    out = {}
    for name in server.models:
        status, raw = server.request("GET", f"{server.management_url}/models/{name}", api="management")
        out[name] = [{"pid": w.get("pid"), "status": w.get("status")} for w in json.loads(raw)[0]["workers"]] \
            if status == 200 else []
    return out


def cuda_memory_mib() -> Optional[dict[int, float]]:
    """{pid: MiB} of the processes on the GPU, ``None`` where there is no ``nvidia-smi``."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        text = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {int(pid): float(used) for pid, used in (line.split(",") for line in text.strip().splitlines() if line)}


def memory_sample(pids: dict[str, int], began: float) -> dict:
    """RSS (MiB) of each model's worker, and its CUDA memory where there is a GPU."""
    sample = {"t_s": round(time.monotonic() - began, 1), "rss_mib": {}}
    for name, pid in pids.items():
        try:
            sample["rss_mib"][name] = round(psutil.Process(pid).memory_info().rss / MIB, 1)
        except psutil.Error:
            sample["rss_mib"][name] = None
    cuda = cuda_memory_mib()
    if cuda is not None:
        sample["cuda_mib"] = {name: cuda.get(pid, 0.0) for name, pid in pids.items()}
    return sample


def warm_up(server: TorchServe, payloads: Path, token: str, rounds: int, users: int) -> None:
    """Every kind of request, from ``users`` threads at once so that batches of every size form,
    ``rounds`` times: caches and allocator pools fill before memory is measured."""
    from concurrent.futures import ThreadPoolExecutor

    image, review = (payloads / "image.png").read_bytes(), (payloads / "review.txt").read_bytes()
    url = server.inference_url
    text = {"Content-Type": "text/plain"}
    calls = [(f"{url}/predictions/shapes", image, {}), (f"{url}/explanations/shapes", image, {}),
             (f"{url}/predictions/reviews", review, text),
             (f"{url}/explanations/reviews", review, {**text, "X-Priority": "high", "X-Explain-Token": token}),
             (f"{url}/explanations/faulty", image, {}), (f"{url}/explanations/shapes", b"not an image", {})]
    with ThreadPoolExecutor(max_workers=users) as pool:  # generous timeout: a busy machine answers slowly
        list(pool.map(lambda call: server.request("POST", *call, timeout=600), calls * rounds * users))


def count_records(sink: str, verify: bool = False):
    from tsexplain.serving.audit import Filters, open_store

    store = open_store(sink, create=False)
    try:
        records = sum(1 for _ in store.records(Filters()))
        return (records, store.verify()[0].ok) if verify else records
    finally:
        store.close()


def audit_summary(sink: str, log: str, load_s: float, before_load: int) -> dict:
    """What the one SQLite sink took: records (those of the load apart), commits and their times
    (warm-up included), and the trail's verification."""
    lines = [(int(n), int(lost), float(ms)) for n, lost, ms in AUDIT_LINE.findall(log)]
    times = sorted(ms for _, _, ms in lines)
    records, verified = count_records(sink, verify=True)

    def pct(q):
        return round(times[min(len(times) - 1, int(q / 100 * len(times)))], 2) if times else None

    return {"sink": sink, "records": records, "records_during_load": records - before_load,
            "written": sum(n for n, _, _ in lines), "lost": sum(lost for _, lost, _ in lines), "commits": len(lines),
            "verified": verified, "records_per_s_during_load": round((records - before_load) / load_s, 2),
            "write_ms_p50": pct(50), "write_ms_p99": pct(99),
            "write_ms_max": round(times[-1], 2) if times else None,
            "sink_busy_share": round(sum(times) / 1000 / load_s, 4)}


def run_soak(store: Path, out: Path, duration: float, users: int, warmup_rounds: int = 10,
             sample_every: float = 10.0, audit: bool = False) -> dict:
    """Serve, warm up, load with locust for ``duration`` s, check; returns the results."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    payloads = write_payloads(out / "payloads")
    token = secrets.token_hex(16)
    env = {"SOAK_EXPLAIN_TOKEN_VALUE": token,
           "TSEXPLAIN_REVIEWS_POLICY": "priority", "TSEXPLAIN_REVIEWS_TOKEN_ENV": "SOAK_EXPLAIN_TOKEN_VALUE",
           "TSEXPLAIN_FAULTY_INJECT_FAULT": "error",
           "TSEXPLAIN_CACHE_MB": "0"}  # the payloads repeat: without this, explanations would be cache hits
    sink = f"sqlite://{out}/audit/audit.db"
    if audit:  # one SQLite file for both models' workers; the trail restarts with the run
        shutil.rmtree(out / "audit", ignore_errors=True)
        env.update({"TSEXPLAIN_AUDIT_SINK": sink, "TSEXPLAIN_SHAPES_AUDIT_RECORD": "all",
                    "TSEXPLAIN_REVIEWS_AUDIT_RECORD": "all"})
    counts_file = out / "locust_counts.json"
    counts_file.unlink(missing_ok=True)
    server = TorchServe(store, MODELS, out / "ts", env=env)
    server.start(timeout=600)  # model loading is slow on a busy 2-core machine
    try:
        warm_up(server, payloads, token, warmup_rounds, users)
        before = workers(server)
        audit_before = count_records(sink) if audit else 0
        pids = {name: ws[0]["pid"] for name, ws in before.items() if ws}
        began = time.monotonic()
        samples = [memory_sample(pids, began)]
        locust_env = {**os.environ, "SOAK_INFERENCE_KEY": server.key("inference") or "",
                      "SOAK_EXPLAIN_TOKEN": token, "SOAK_PAYLOADS": str(payloads), "SOAK_COUNTS": str(counts_file)}
        command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", server.inference_url,
                   "--users", str(users), "--spawn-rate", str(users), "--run-time", f"{int(duration)}s",
                   "--stop-timeout", "30", "--only-summary", "--exit-code-on-error", "0",
                   "--json-file", str(out / "locust_stats"), "--csv", str(out / "locust")]
        with open(out / "locust.log", "wb") as log:
            process = subprocess.Popen(command, cwd=out, env=locust_env, stdout=log, stderr=subprocess.STDOUT)
            stop = threading.Event()

            def sample_loop():
                while not stop.wait(sample_every):
                    samples.append(memory_sample(pids, began))

            sampler = threading.Thread(target=sample_loop, daemon=True)
            sampler.start()
            try:
                returncode = process.wait(timeout=duration + 120)
            finally:
                if process.poll() is None:
                    process.kill()
                stop.set()
                sampler.join()
        load_s = time.monotonic() - began
        samples.append(memory_sample(pids, began))
        after = workers(server)
    finally:
        server.stop()
    counts = json.loads(counts_file.read_text()) if counts_file.exists() else []
    result = summarize(counts, before, after, samples, load_s, duration, users, returncode)
    if audit:
        result["audit"] = audit_summary(sink, server.log_text(), load_s, audit_before)
        result["passed"] = result["passed"] and result["audit"]["verified"] and result["audit"]["lost"] == 0
    return result


def summarize(counts: list[dict], before: dict, after: dict, samples: list[dict], load_s: float,
              duration: float, users: int, locust_returncode: int) -> dict:
    total = sum(row["count"] for row in counts)
    unexpected = [row for row in counts if row["status"] != row["expected"]]
    status_counts: dict[str, int] = {}
    for row in counts:
        status_counts[str(row["status"])] = status_counts.get(str(row["status"]), 0) + row["count"]
    injected = sum(row["count"] for row in counts if row["kind"] == "faulty_explanation" and row["status"] == 503)
    unexpected_5xx = sum(row["count"] for row in unexpected if row["status"] >= 500)
    bad_not_4xx = sum(row["count"] for row in counts if 400 <= row["expected"] < 500 and not 400 <= row["status"] < 500)
    first, last = samples[0]["rss_mib"], samples[-1]["rss_mib"]
    rss = {name: {"start": first.get(name), "end": last.get(name),
                  "growth": None if first.get(name) is None or last.get(name) is None
                  else round(last[name] - first[name], 1),
                  "max": max((s["rss_mib"].get(name) or 0) for s in samples)} for name in first}
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
                    "gpu": cuda_memory_mib() is not None},
        "duration_s": duration, "load_s": round(load_s, 1), "users": users,
        "requests": total, "status_counts": status_counts, "by_kind": counts,
        "injected_5xx": injected, "unexpected": unexpected, "unexpected_5xx": unexpected_5xx,
        "bad_requests_not_4xx": bad_not_4xx,
        "workers_before": before, "workers_after": after,
        "all_ready": all(w["status"] == "READY" for ws in after.values() for w in ws) and all(after.values()),
        "same_pids": {m: [w["pid"] for w in ws] for m, ws in before.items()}
        == {m: [w["pid"] for w in ws] for m, ws in after.items()},
        "rss_mib": rss, "samples": samples, "locust_returncode": locust_returncode,
    }
    if "cuda_mib" in samples[0]:
        result["cuda_mib"] = {name: {"start": samples[0]["cuda_mib"][name], "end": samples[-1]["cuda_mib"][name]}
                              for name in samples[0]["cuda_mib"]}
    result["passed"] = bool(total and not unexpected and result["all_ready"] and result["same_pids"]
                            and locust_returncode == 0)
    return result


def markdown(result: dict, command: str) -> str:
    lines = [
        f"- date (UTC): {result['date']}",
        f"- machine: {result['machine']['cpus']} CPUs, {result['machine']['memory_gib']} GiB, "
        f"GPU: {'yes' if result['machine']['gpu'] else 'no'} ({result['machine']['platform']})",
        f"- command: `{command}`",
        f"- load: {result['load_s']} s with {result['users']} locust users; {result['requests']} requests",
        f"- status counts: " + ", ".join(f"{s}: {n}" for s, n in sorted(result["status_counts"].items())),
        f"- injected 5xx (explain.inject_fault): {result['injected_5xx']}; unexpected answers: "
        f"{sum(r['count'] for r in result['unexpected'])} (5xx: {result['unexpected_5xx']}); "
        f"bad requests not answered 4xx: {result['bad_requests_not_4xx']}",
        f"- workers READY at the end: {result['all_ready']}; same PIDs as after warm-up: {result['same_pids']}",
        f"- passed: {result['passed']}",
        "",
        "| request kind | expected | status | count |",
        "|---|---|---|---|",
        *[f"| {r['kind']} | {r['expected']} | {r['status']} | {r['count']} |" for r in result["by_kind"]],
        "",
        "| worker | RSS after warm-up (MiB) | RSS at the end (MiB) | growth (MiB) | max (MiB) |",
        "|---|---|---|---|---|",
        *[f"| {name} | {v['start']} | {v['end']} | {v['growth']} | {v['max']} |" for name, v in result["rss_mib"].items()],
    ]
    if "audit" in result:
        a = result["audit"]
        lines += ["", f"Audit trail (one SQLite file, both models): {a['records_during_load']} records during the "
                  f"load, {a['records_per_s_during_load']} records/s; {a['records']} in all (warm-up included) in "
                  f"{a['commits']} commits, commit p50 "
                  f"{a['write_ms_p50']} ms, p99 {a['write_ms_p99']} ms, max {a['write_ms_max']} ms; the sink busy "
                  f"{100 * a['sink_busy_share']:.2f}% of the time; lost {a['lost']}; verified: {a['verified']}"]
    if "cuda_mib" in result:
        lines += ["", "| worker | CUDA start (MiB) | CUDA end (MiB) |", "|---|---|---|",
                  *[f"| {n} | {v['start']} | {v['end']} |" for n, v in result["cuda_mib"].items()]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=300, help="seconds of load (after warm-up)")
    parser.add_argument("--users", type=int, default=8, help="concurrent locust users")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "soak")
    parser.add_argument("--store", type=Path, help="a model store with shapes.mar and reviews.mar (default: build them)")
    parser.add_argument("--warmup-rounds", type=int, default=10)
    parser.add_argument("--audit", action="store_true", help="with the audit trail on (one SQLite sink)")
    args = parser.parse_args(argv)
    if not 1 <= args.duration <= 3600 or not 1 <= args.users <= 64:
        parser.error("--duration must be in [1, 3600] s and --users in [1, 64]")
    store = args.store or build_demo_store(args.out / "store")
    result = run_soak(store, args.out, args.duration, args.users, args.warmup_rounds, audit=args.audit)
    command = "python -m benchmarks.soak " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "soak.json").write_text(json.dumps(result, indent=1))
    (args.out / "soak.md").write_text(markdown(result, command))
    print(markdown(result, command))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
