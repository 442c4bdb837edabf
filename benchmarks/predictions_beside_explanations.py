"""/predictions latency beside explanation traffic, through a real TorchServe (CPU demo model).

Three phases of sequential /predictions on the `shapes` demo (policy: priority, token, on_denied: predict):
  alone; beside a background client sending /predictions; beside a background client sending
/explanations (alternately priority+token, which are computed, and plain, which are denied).
Prints p50/p90 per phase, and per phase how many prediction answers are bitwise identical to the
answer alone, and how many have the same labels in the same order with probabilities within 1e-5
(requests that share a batch are computed in a larger batch, which changes CPU kernels' rounding).
Usage: python benchmarks/predictions_beside_explanations.py [--requests 200]
"""
import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import build_mar  # noqa: E402
from tsexplain.launcher import TorchServe  # noqa: E402
from tsexplain.synthetic import shapes  # noqa: E402


def png(image):
    import io
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    build_mar.main(["demo", "--export-path", str(work / "store")])
    size = json.loads((ROOT / "build/demo/shapes/training.json").read_text())["image_size"]
    image = png(shapes.generate(1, 99, size)[0].image)
    env = {"TSEXPLAIN_SHAPES_POLICY": "priority", "TSEXPLAIN_SHAPES_ON_DENIED": "predict",
           "TSEXPLAIN_SHAPES_TOKEN_ENV": "BENCH_TOKEN", "BENCH_TOKEN": "t0ken"}
    with TorchServe(work / "store", {"shapes": "shapes.mar"}, work / "ts", env=env) as ts:
        url = f"{ts.inference_url}/predictions/shapes"
        reference = ts.request("POST", url, image)[1]
        for _ in range(20):  # warm-up
            ts.request("POST", url, image)

        def phase(background):
            stop = threading.Event()

            def loop():
                i = 0
                while not stop.is_set():
                    if background == "predictions":
                        ts.request("POST", url, image)
                    else:
                        headers = {"X-Priority": "high", "X-Explain-Token": "t0ken"} if i % 2 else {}
                        ts.request("POST", f"{ts.inference_url}/explanations/shapes", image, headers)
                    i += 1

            thread = threading.Thread(target=loop) if background else None
            if thread:
                thread.start()
            latencies, same, close, worst = [], 0, 0, 0.0
            expected = json.loads(reference)
            for _ in range(args.requests):
                began = time.perf_counter()
                status, body = ts.request("POST", url, image)
                latencies.append((time.perf_counter() - began) * 1000)
                got = json.loads(body)
                same += status == 200 and body == reference
                diff = max(abs(got[k] - expected[k]) for k in expected) if list(got) == list(expected) else 1.0
                close += diff <= 1e-5
                worst = max(worst, diff)
            stop.set()
            if thread:
                thread.join()
            latencies.sort()
            return {"p50_ms": round(statistics.median(latencies), 2),
                    "p90_ms": round(latencies[int(0.9 * len(latencies))], 2), "bitwise_identical": same,
                    "same_labels_within_1e-5": close, "max_probability_difference": worst}

        results = {name: phase(bg) for name, bg in
                   [("alone", None), ("beside_predictions", "predictions"), ("beside_explanations", "explanations")]}
    results["ratio_p50_explanations_vs_predictions"] = round(
        results["beside_explanations"]["p50_ms"] / results["beside_predictions"]["p50_ms"], 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
