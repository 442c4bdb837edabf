"""In-process cost of the prediction path: our handler's ``handle()`` against the stock
handler's on the same model, batch and inputs, with no server in between.

Both handlers are staged as the benchmark stages them (``benchmarks/models.py``, the
``_b8`` variants) and driven as TorchServe 0.12's worker drives them: the rows and
headers of a ``/predictions`` batch, then ``create_predict_response`` (which encodes the
stock handler's dicts as JSON, ours being JSON already). Timings are interleaved,
ours and stock alternating in the same process, so that a busy machine slows both
alike; medians are reported. ``--profile`` adds a cProfile of each handler.

    python -m benchmarks.overhead --models shapes reviews --reps 300 [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import json
import logging
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from benchmarks import models  # noqa: E402

STOCK_CLASSES = {"image_classifier_sized": "SizedImageClassifier",
                 "transformer_seq_classifier": "TransformersSeqClassifierHandler",
                 "ts.torch_handler.image_classifier": "ImageClassifier"}
OURS_CLASSES = {"image_explainer": "ImageExplainer", "text_explainer": "TextExplainer"}


class Driven:
    """A handler from a staged model directory, driven as TorchServe's worker drives it."""

    def __init__(self, model_dir: Path, content_type: str):
        import yaml
        from harness import RecordingMetrics
        from ts.context import Context

        manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
        config = yaml.safe_load((model_dir / manifest["model"]["configFile"]).read_text())
        handler = manifest["model"]["handler"]
        module = handler[:-3] if handler.endswith(".py") else handler
        if not (model_dir / f"{module}.py").exists():  # a TorchServe default handler ("image_classifier")
            module = f"ts.torch_handler.{module}"
        self.name = manifest["model"]["modelName"]
        self.content_type = content_type
        self.context = Context(self.name, str(model_dir), manifest, 8, None, "0.12.0",
                               metrics=RecordingMetrics(), model_yaml_config=config)
        sys.path.insert(0, str(model_dir))  # as the worker has it while the model loads
        # Each worker is its own process; here the model directories share one. The stock handler
        # imports its model file as module ``model``: drop the previous model's, or it builds that.
        for name in [n for n, m in sys.modules.items() if str(model_dir.parent) in (getattr(m, "__file__", "") or "")]:
            del sys.modules[name]
        try:
            handler_module = importlib.import_module(module)
            self.handler = getattr(handler_module, {**STOCK_CLASSES, **OURS_CLASSES}[module])()
            self.handler.initialize(self.context)
        finally:
            sys.path.remove(str(model_dir))

    def batch(self, bodies: list[bytes]):
        """The rows, headers and request ids of one /predictions batch."""
        from ts.context import RequestProcessor

        headers = [RequestProcessor({"url_path": f"/predictions/{self.name}", "Host": "127.0.0.1:8080",
                                     "User-Agent": "python-requests/2.32.3", "Accept-Encoding": "gzip, deflate",
                                     "Accept": "*/*", "Connection": "keep-alive", "Content-Type": self.content_type,
                                     "Content-Length": str(len(body))}) for body in bodies]
        return [{"body": body} for body in bodies], headers, {i: f"req-{i}" for i in range(len(bodies))}

    def __call__(self, batch) -> bytes:
        """handle() and the worker's response encoding, as TorchServe's Service.predict does."""
        from ts.protocol.otf_message_handler import create_predict_response

        rows, headers, ids = batch
        self.context.request_processor = headers
        self.context.request_ids = ids
        for i in range(len(rows)):  # a fresh response status per batch, as the worker has
            self.context.set_response_status(200, "", i)
        out = self.handler.handle(rows, self.context)
        return create_predict_response(out, ids, "Prediction success", 200, self.context)

    def answers(self, batch) -> list[bytes]:
        """The answer bytes the client gets for each request of ``batch``."""
        rows, headers, ids = batch
        self.context.request_processor = headers
        self.context.request_ids = ids
        out = self.handler.handle(rows, self.context)
        return [v.encode() if isinstance(v, str) else json.dumps(v, indent=2).encode() for v in out]


class CachedForward:
    """Stands in for a model: the real model's output for the first input of each shape,
    then that output again (a copy) at no cost, so that timings show the handler's own work."""

    def __init__(self, model):
        self.model, self.outputs = model, {}

    def __call__(self, *args, **kwargs):
        key = tuple(tuple(a.shape) for a in args if hasattr(a, "shape")) + tuple(
            (k, tuple(v.shape)) for k, v in kwargs.items() if hasattr(v, "shape"))
        if key not in self.outputs:
            self.outputs[key] = self.model(*args, **kwargs)
        out = self.outputs[key]
        if hasattr(out, "logits"):
            return type(out)(logits=out.logits.clone())
        return out.clone() if hasattr(out, "clone") else out

    def __getattr__(self, name):
        return getattr(self.model, name)


def stage(name: str, export: Path, n_inputs: int = 8) -> models.Model:
    os.environ.setdefault(models.EXPLAIN_TOKEN_ENV, "overhead-token")
    return models.BUILDERS[name](export, n_inputs)


def bodies_of(model: models.Model, stock: bool, n: int) -> list[bytes]:
    out = []
    for i in range(n):
        body, _ = model.body(i, stock, explain=False)
        out.append(body)
    return out


def top_class(answer: bytes) -> str:
    """The first-ranked label of an answer: a ``{label: probability}`` object (ours, stock
    images) or a bare label (the stock text handler)."""
    if not answer.startswith(b"{"):
        return answer.decode()
    probabilities = json.loads(answer)
    return max(probabilities, key=probabilities.get)


def interleaved(ours: Driven, stock: Driven, ours_batch, stock_batch, reps: int) -> dict:
    """Median seconds of each, the two alternating (and which goes first alternating)."""
    times = {"ours": [], "stock": []}
    for _ in range(max(3, reps // 20)):  # warm-up
        ours(ours_batch), stock(stock_batch)
    for rep in range(reps):
        order = (("ours", ours, ours_batch), ("stock", stock, stock_batch))
        for label, driven, batch in (order if rep % 2 == 0 else order[::-1]):
            began = time.perf_counter()
            driven(batch)
            times[label].append(time.perf_counter() - began)
    ours_median, stock_median = statistics.median(times["ours"]), statistics.median(times["stock"])
    # the ratio rep by rep (the pair ran back to back): less sensitive to load swings
    paired = statistics.median(o / s for o, s in zip(times["ours"], times["stock"]))
    return {"ours_ms": ours_median * 1000, "stock_ms": stock_median * 1000,
            "ratio": ours_median / stock_median, "paired_ratio": paired, "reps": reps}


def profile(driven: Driven, batch, reps: int, top: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(reps):
        driven(batch)
    profiler.disable()
    buffer = io.StringIO()
    stats = pstats.Stats(profiler, stream=buffer)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return buffer.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["shapes"], choices=sorted(models.BUILDERS))
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 1])
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--export", type=Path, default=None, help="where to stage (default: a temporary folder)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of each handler at batch 8")
    parser.add_argument("--no-forward", action="store_true",
                        help="replace each model's forward by its cached output: the handlers' own cost only")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    # TorchServe's worker logs INFO to stdout (model_service_worker.py); do the same, into /dev/null
    logging.basicConfig(stream=open(os.devnull, "w"), format="%(message)s", level=logging.INFO, force=True)
    export = args.export or Path(tempfile.mkdtemp(prefix="overhead-"))
    export.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.models:
        model = stage(name, export)
        ours = Driven(export / f"{name}_b8", model.content_type)
        stock = Driven(export / f"{name}_stock_b8", model.content_type)
        if args.no_forward:
            for driven in (ours, stock):
                # ours predicts through its runner (tsexplain.serving.runners), stock through handler.model
                holder = getattr(driven.handler, "runner", driven.handler)
                holder.model = CachedForward(holder.model)
        for n in args.batches:
            ours_batch = ours.batch(bodies_of(model, False, n))
            stock_batch = stock.batch(bodies_of(model, True, n))
            row = {"model": name, "batch": n, **interleaved(ours, stock, ours_batch, stock_batch, args.reps)}
            mine, theirs = ours.answers(ours_batch), stock.answers(stock_batch)
            row["ours_answer_bytes"], row["stock_answer_bytes"] = len(mine[0]), len(theirs[0])
            row["same_top_class"] = [top_class(a) == top_class(b) for a, b in zip(mine, theirs)]
            results.append(row)
            print(f"{name} batch {n}: ours {row['ours_ms']:.2f} ms, stock {row['stock_ms']:.2f} ms, "
                  f"ratio {row['ratio']:.3f} (paired {row['paired_ratio']:.3f}), {args.reps} reps; "
                  f"answer bytes ours {row['ours_answer_bytes']}, stock {row['stock_answer_bytes']}", flush=True)
        print(f"{name} answers (request 0): ours {mine[0].decode()!r}\n  stock {theirs[0].decode()!r}")
        if args.profile:
            batch8 = ours.batch(bodies_of(model, False, 8))
            print(f"--- cProfile, ours, {name}, batch 8\n" + profile(ours, batch8, 100, 40))
            batch8 = stock.batch(bodies_of(model, True, 8))
            print(f"--- cProfile, stock, {name}, batch 8\n" + profile(stock, batch8, 100, 40))
    if args.json:
        args.json.write_text(json.dumps({"torch_threads": torch.get_num_threads(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
