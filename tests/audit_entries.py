"""Audit entries for the tests, and a writer process (``python tests/audit_entries.py URL ...``)
that records batches and prints each id once its ``record()`` has returned."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tsexplain.serving.audit import AuditEntry, AuditSettings, AuditTrail  # noqa: E402


def image_entry(k: int = 0, side: int = 7, data: bytes = None, caller: str = "team-a", method: str = "gradcam",
                **fields) -> AuditEntry:
    values = [[round(((i * side + j + k) % 11) / 10, 3) for j in range(side)] for i in range(side)]
    return AuditEntry(
        route="explanations", method=method, target={"index": 3, "label": "star"},
        parameters={"layer": "layer2", "heatmap_size": "feature", "outputs": ["heatmap"]},
        predictions=[{"index": 3, "label": "star", "probability": 0.99}, {"index": 4, "label": "cross", "probability": 0.01}],
        explanation={"method": method, "target": {"index": 3, "label": "star"}, "contrast": None, "layer": "layer2",
                     "heatmap": {"shape": [side, side], "values": values}, "cached": False, "elapsed_ms": 9.1,
                     "overlay_png": "iVBORw0KGgo"},
        input_bytes=data if data is not None else f"image-{k}".encode(), content_type="image/png",
        elapsed_ms=9.1, priority="audit", caller=caller, request_id=f"req-{k}", **fields)


def text_entry(k: int = 0, words: int = 8, caller: str = None) -> AuditEntry:
    tokens = [{"token": f"w{i}", "start": 3 * i, "end": 3 * i + 2, "attribution": (i - words / 2) / words}
              for i in range(words)]
    words_ = [{"word": t["token"], "start": t["start"], "end": t["end"], "attribution": t["attribution"]} for t in tokens]
    return AuditEntry(
        route="kserve_v2", method="layer_ig", target={"index": 1, "label": "positive"},
        parameters={"n_steps": 50, "layer": "bert.embeddings.word_embeddings", "baseline": "pad", "precision": "fp32"},
        predictions=[{"index": 1, "label": "positive", "probability": 0.9}],
        explanation={"method": "layer_ig", "tokens": tokens, "words": words_, "top_words": words_[:5],
                     "convergence_delta": {"absolute": 1e-5, "relative": float("nan")}, "converged": True, "html": "<b>"},
        input_bytes=" ".join(t["token"] for t in tokens).encode(), content_type="text/plain", elapsed_ms=200.5,
        caller=caller)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sink")
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--keep-input", action="store_true")
    parser.add_argument("--start-at", type=float, default=0.0, help="wait until this time.time() after opening")
    args = parser.parse_args()
    settings = AuditSettings(record="all", sink=args.sink, keep_input=args.keep_input, timeout_ms=30_000)
    trail = AuditTrail.open(settings, model_name=args.model, model_version="1.0", mar_sha256="ab" * 32)
    print(f"writer {trail.writer}", flush=True)
    while time.time() < args.start_at:
        time.sleep(0.002)
    for b in range(args.batches):
        ids = trail.record([image_entry(b * args.batch_size + i) for i in range(args.batch_size)])
        sys.stdout.write("".join(f"id {i}\n" for i in ids))
        sys.stdout.flush()
    trail.close()
    print(f"done {os.getpid()}", flush=True)


if __name__ == "__main__":
    main()
