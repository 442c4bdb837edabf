"""Helpers of the audit trail's server tests: ``tsexplain-audit`` as a user runs it, and a
soak that SIGKILLs a worker midway and keeps every explanation id a client received."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent


def audit_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """``python -m tsexplain.tools.audit ...`` (the venv's console script may be another checkout's)."""
    return subprocess.run([sys.executable, "-m", "tsexplain.tools.audit", *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)})


def exported(sink: str) -> dict:
    """Every record of the trail at ``sink``, by id (``tsexplain-audit export``)."""
    done = audit_cli("--db", sink, "export")
    assert done.returncode == 0, done.stderr
    return {r["id"]: r for r in map(json.loads, done.stdout.splitlines())}


def worker_pids(server, model: str) -> list:
    status, raw = server.request("GET", f"{server.management_url}/models/{model}", api="management")
    return [w.get("pid") for w in json.loads(raw)[0]["workers"] if w.get("status") == "READY"] if status == 200 else []


@dataclass
class Target:
    """Where a soak sends traffic: a TorchServe and one of its models, and the bodies."""

    server: object
    model: str
    explanation: Callable[[random.Random], tuple[bytes, dict]]
    prediction: Callable[[random.Random], tuple[bytes, dict]]


@dataclass
class SoakResult:
    answers: list = field(default_factory=list)  # (target index, kind, status, explanation_id or None)
    killed_pid: Optional[int] = None
    new_pid: Optional[int] = None

    def ids(self, target: Optional[int] = None) -> list:
        return [a[3] for a in self.answers if a[3] is not None and (target is None or a[0] == target)]


def soak(targets: list[Target], threads: int, kill: int, kill_after_s: float, after_restart_s: float,
         restart_timeout_s: float = 300) -> SoakResult:
    """Traffic from ``threads`` clients (one explanation in three is a prediction) to every
    target; after ``kill_after_s`` the worker of ``targets[kill]`` is SIGKILLed; the load goes
    on until TorchServe has a new worker READY and ``after_restart_s`` more."""
    result, lock, stop = SoakResult(), threading.Lock(), threading.Event()

    def client(number: int):
        rng = random.Random(number)
        while not stop.is_set():
            index = rng.randrange(len(targets))
            target = targets[index]
            kind = "prediction" if rng.random() < 1 / 3 else "explanation"
            body, headers = getattr(target, kind)(rng)
            try:
                status, raw = target.server.request("POST", f"{target.server.inference_url}/{kind}s/{target.model}",
                                                    body, headers, timeout=300)
            except OSError:  # the connection of a request in the killed worker
                status, raw = 0, b""
            record_id = None
            if kind == "explanation" and status == 200:
                record_id = json.loads(raw)["explanation"]["explanation_id"]
            with lock:
                result.answers.append((index, kind, status, record_id))

    pool = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
    for thread in pool:
        thread.start()
    try:
        time.sleep(kill_after_s)
        victim = targets[kill]
        [result.killed_pid] = worker_pids(victim.server, victim.model)
        os.kill(result.killed_pid, signal.SIGKILL)
        deadline = time.monotonic() + restart_timeout_s
        while time.monotonic() < deadline:
            pids = worker_pids(victim.server, victim.model)
            if pids and pids[0] != result.killed_pid:
                result.new_pid = pids[0]
                break
            time.sleep(0.5)
        time.sleep(after_restart_s)
    finally:
        stop.set()
        for thread in pool:
            thread.join(timeout=600)
    return result
