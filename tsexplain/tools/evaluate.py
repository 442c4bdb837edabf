"""``tsexplain-eval``: score a model's explanations, on your data or on the synthetic sets.

    tsexplain-eval image --mar model_store/my-model.mar --images photos/ --sanity
    tsexplain-eval text --mar model_store/my-text.mar --texts texts.txt --sanity
    tsexplain-eval image --url http://127.0.0.1:8080 --model my-model --images photos/ --resize 256 --crop 224
    tsexplain-eval image --model-dir build/demo/shapes

The model: ``--mar`` (a MAR loaded in process as TorchServe's worker loads it),
``--url`` with ``--model`` (a served model) or ``--model-dir`` (a demo model folder).
The data: ``--images`` (a folder of images of any size) or ``--texts`` (one text per
line); without them, the synthetic shapes or reviews, whose ground truth adds the
pointing game and the cue-word hit rate. Always: deletion and insertion curves against
random maps (images), word deletion against random words (text). ``--sanity`` adds the
model-randomisation sanity check (in process only: it needs the weights). Prints the
metrics and writes ``report.json``, ``report.md``, ``curves.png`` (and ``sanity.png``)
to ``--out``. Definitions: :mod:`tsexplain.tools.evaluation`, :mod:`tsexplain.tools.sanity`.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import yaml

from . import eval_data as data
from . import evaluation as ev
from .eval_backends import (EvaluationError, ImageRequests, InProcessImage, InProcessText, ServedImage, ServedText,
                            read_inference_key)
from .eval_report import format_table, write_report
from .sanity import DEFAULT_THRESHOLD, cascade_blocks, sanity_check

DEFAULT_SEED = 20261123  # not a training or validation seed of the demo models
GEOMETRY_TOLERANCE = 1e-3  # |log p| difference allowed between an image and its model view (float noise)
NO_WEIGHTS = ("the sanity check randomises the model's weights, which a server does not expose: run it in "
              "process on the MAR you serve (--mar FILE) or on a model folder (--model-dir)")


def _summaries(curves: ev.ImageCurves, baseline: ev.ImageCurves) -> dict:
    return {"deletion_auc": ev.summarize(curves.deletion_auc),
            "deletion_auc_random": ev.summarize(baseline.deletion_auc),
            "deletion_auc_gap": ev.summarize(baseline.deletion_auc - curves.deletion_auc),  # > 0: faster than random
            "insertion_auc": ev.summarize(curves.insertion_auc),
            "insertion_auc_random": ev.summarize(baseline.insertion_auc),
            "insertion_auc_gap": ev.summarize(curves.insertion_auc - baseline.insertion_auc)}


def evaluate_images(backend, method: Optional[str], views: Sequence[data.ImageView], seed: int, steps: int,
                    random_maps: int, batch_size: int = 64) -> dict:
    """Deletion/insertion curves (method and random maps) on ``views``, and the pointing game
    and accuracy where the views carry ground truth (synthetic shapes)."""
    frames, regions = data.frames(views), [v.region for v in views]
    explained = backend.explain(frames, method)
    maps = [e.heatmap for e in explained]
    for view, m in zip(views, maps):
        if m.ndim != 2:
            raise EvaluationError(f"{view.name}: the explanation is not a 2-D map (shape {list(m.shape)})")
    targets = [e.target for e in explained]
    curves = ev.image_curves(frames, maps, targets, backend.predict_proba, steps, seed, batch_size, regions=regions)
    baseline = ev.random_image_curves(frames, [m.shape for m in maps], targets, backend.predict_proba, steps,
                                      random_maps, seed, batch_size, regions=regions)
    metrics = _summaries(curves, baseline)
    labelled = all(v.label is not None for v in views)
    pointing = ([ev.pointing_hit(m, v.box, v.region.height, v.region.width) for m, v in zip(maps, views)]
                if all(v.box is not None for v in views) else None)
    if pointing is not None:
        metrics["pointing_game"] = float(np.mean(pointing))
    if labelled:
        metrics["accuracy"] = float(np.mean([t == v.label for t, v in zip(targets, views)]))
        # Per true class: a class the model gives to a blank image (the demo's "star") cannot lose
        # probability when its evidence is deleted, whatever the map.
        labels = getattr(backend, "labels", None) or []
        metrics["deletion_auc_by_class"] = {
            (labels[c] if c < len(labels) and labels[c] else str(c)): {
                "n": int(rows.sum()), "deletion_auc": float(curves.deletion_auc[rows].mean()),
                "deletion_auc_random": float(baseline.deletion_auc[rows].mean())}
            for c in sorted({v.label for v in views}) for rows in [np.array([v.label == c for v in views])]}
    region = views[0].region
    return {
        "task": "image",
        "method": explained[0].method if explained else method,
        "metrics": metrics,
        "settings": {"n": len(views), "seed": seed, "steps": steps, "random_maps": random_maps,
                     "map_shape": list(maps[0].shape) if maps else None,
                     "model_input": f"{region.width}x{region.height} (first image)",
                     "deletion_substrate": "the model input's mean colour",
                     "insertion_start": "Gaussian blur, sigma = 1/8 of the model input's shorter side",
                     "order": "map upsampled bilinearly to the model input, most salient first, ties in random order"},
        "curves": {"x": np.linspace(0, 1, steps + 1).tolist(),
                   "deletion": curves.deletion.mean(0).tolist(), "deletion_random": baseline.deletion.mean(0).tolist(),
                   "insertion": curves.insertion.mean(0).tolist(),
                   "insertion_random": baseline.insertion.mean(0).tolist()},
        # probability: the explained class's, on the image as it is; deletion_end: once every pixel the
        # model sees is deleted (the mean colour)
        "per_sample": [{"name": v.name, "label": v.label, "target": t, "probability": float(p), "deletion_auc": float(d),
                        "insertion_auc": float(i), "deletion_auc_random": float(dr),
                        "insertion_auc_random": float(ir), "deletion_end": float(end),
                        **({"pointing_hit": bool(pointing[k])} if pointing is not None else {})}
                       for k, (v, t, p, d, i, dr, ir, end) in enumerate(zip(
                           views, targets, curves.deletion[:, 0], curves.deletion_auc, curves.insertion_auc,
                           baseline.deletion_auc, baseline.insertion_auc, curves.deletion[:, -1]))],
    }


def evaluate_text(backend, method: Optional[str], texts: Sequence[str], seed: int, k: int, max_words: int,
                  repeats: int, batch_size: int = 64, samples: Optional[Sequence] = None) -> dict:
    """Word-deletion curves (method and random orders) on ``texts``; with the synthetic
    ``samples`` behind them, also cue hit@k and accuracy."""
    explained = backend.explain(list(texts), method)
    words = [e.words for e in explained]
    targets = [e.target for e in explained]
    curves = ev.word_deletion_curves(texts, words, targets, backend.predict_proba, max_words, "signed", batch_size)
    baseline = ev.random_word_deletion_curves(texts, words, targets, backend.predict_proba, max_words, repeats,
                                              seed, batch_size)
    drop, drop_random = curves[:, :1] - curves, baseline[:, :1] - baseline  # p(full text) - p(k words deleted)
    metrics = {}
    hits = None
    if samples is not None:
        hits = [ev.top_k_hit(w, s.sentiment_span, k) for w, s in zip(words, samples)]
        metrics[f"cue_hit_at_{k}"] = float(np.mean(hits))
        metrics["cue_hit_at_1"] = float(np.mean([ev.top_k_hit(w, s.sentiment_span, 1) for w, s in zip(words, samples)]))
        metrics["accuracy"] = float(np.mean([t == s.label for t, s in zip(targets, samples)]))
    metrics["deletion_auc"] = ev.summarize(ev.auc(curves))
    metrics["deletion_auc_random"] = ev.summarize(ev.auc(baseline))
    for j in sorted({1, min(3, max_words), max_words}):
        metrics[f"drop_at_{j}"] = ev.summarize(drop[:, j])
        metrics[f"drop_at_{j}_random"] = ev.summarize(drop_random[:, j])
    return {
        "task": "text",
        "method": explained[0].method if explained else method,
        "metrics": metrics,
        "settings": {"n": len(texts), "seed": seed, "k": k, "max_words": max_words, "random_repeats": repeats,
                     "ranking": "signed attribution towards the target, largest first",
                     **({"hit_ranking": "|attribution|, against the sentiment cue word's span"} if samples else {})},
        "curves": {"x": list(range(max_words + 1)), "deletion": curves.mean(0).tolist(),
                   "deletion_random": baseline.mean(0).tolist()},
        "per_sample": [{"target": t, "curve": c.tolist(), "random": r.tolist(),
                        **({"label": samples[i].label, "hit": bool(hits[i])} if samples is not None else {})}
                       for i, (t, c, r) in enumerate(zip(targets, curves, baseline))],
    }


def run_sanity(backend, task: str, inputs: Sequence, method: Optional[str], seed: int,
               threshold: float = DEFAULT_THRESHOLD) -> dict:
    """The model-randomisation sanity check (:mod:`.sanity`) on ``inputs``, each explained
    for the class the intact model predicts."""
    model = getattr(backend, "model", None)
    if not isinstance(model, torch.nn.Module):
        raise EvaluationError(NO_WEIGHTS)
    if isinstance(model, torch.jit.ScriptModule):
        raise EvaluationError("the sanity check watches the model's layers with hooks, which TorchScript "
                              "modules do not support")
    targets = [int(t) for t in backend.predict_proba(list(inputs)).argmax(axis=1)]
    blocks = cascade_blocks(model, lambda: backend.run_forward(inputs[0]))

    def explain() -> list[np.ndarray]:
        explained = backend.explain(list(inputs), method, targets)
        if task == "image":
            return [e.heatmap for e in explained]
        return [np.array([w["attribution"] for w in e.words], dtype=np.float64) for e in explained]

    result = sanity_check(model, explain, blocks, seed, threshold)
    result["method"] = backend.explain(list(inputs[:1]), method, targets[:1])[0].method
    result["blocks"] = [{"name": b.name, "modules": list(b.modules)} for b in blocks]
    return result


def check_geometry(backend, views: Sequence[data.ImageView], notes: list) -> dict:
    """That the model sees a view's frame as it sees the original image: the resize step
    taken here is the model's (equal probabilities), and the map covers the assumed crop."""
    worst, checked = 0.0, 0
    for view in views[:2]:
        try:
            p_original = backend.predict_proba([np.asarray(view.original)])[0]
        except EvaluationError as exc:  # e.g. over the server's handler.max_image_pixels
            notes.append(f"the resize could not be checked on {view.name}: {exc}")
            continue
        p_frame = backend.predict_proba([view.frame])[0]
        checked += 1
        seen = (p_original > 1e-6) | (p_frame > 1e-6)
        worst = max(worst, float(np.abs(np.log(np.clip(p_original[seen], 1e-12, 1))
                                        - np.log(np.clip(p_frame[seen], 1e-12, 1))).max()))
    if worst > GEOMETRY_TOLERANCE:
        raise EvaluationError(
            f"the model does not see the resized image as it sees the original (log-probabilities differ by "
            f"{worst:.3g}): its resize step is not resize={backend.preprocessing.resize!r}. A served model: give its "
            "--resize/--crop or --model-config (its MAR or config YAML); in process: the handler's preprocessing is "
            "not a torchvision resize and centre crop, which this evaluation reproduces")
    region, crop = views[0].region, "the model folder's own"
    if isinstance(backend, ImageRequests):  # through the handler: ask for a map at the model's input size
        try:
            [full] = backend.explain([views[0].frame], None, heatmap_size="input")
        except EvaluationError as exc:
            full, crop = None, "not checked (heatmap_size: input refused)"
            notes.append(f"the crop could not be checked: {exc}")
        if full is not None:
            if full.heatmap.shape != (region.height, region.width):
                raise EvaluationError(f"the model's input is {full.heatmap.shape[1]}x{full.heatmap.shape[0]}, not "
                                      f"the crop {region.width}x{region.height} assumed: give its --crop")
            crop = "checked"
    return {"resize": f"checked on {checked} images" if checked else "not checked",
            "max_log_probability_difference": worst, "crop": crop}


# ---------------------------------------------------------------------------- CLI

def _size(value: str):
    parsed = yaml.safe_load(value)
    if parsed is None or isinstance(parsed, int) or (isinstance(parsed, list) and len(parsed) == 2):
        return parsed
    raise argparse.ArgumentTypeError(f"{value!r}: an int, [h, w] or null")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsexplain-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="task", required=True)
    image = sub.add_parser("image", help="image classifiers: deletion and insertion against random maps")
    text = sub.add_parser("text", help="text classifiers: word deletion against random words")
    for p in (image, text):
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("--mar", help="evaluate in process: a MAR, loaded as TorchServe's worker loads it")
        where.add_argument("--url", help="a served model: TorchServe's inference address (needs --model)")
        where.add_argument("--model-dir", help="evaluate in process: a demo model folder (see README)")
        p.add_argument("--model", help="the served model's name (with --url)")
        p.add_argument("--method", help="explanation method (default: the model's default)")
        p.add_argument("--n", type=int, default=32, help="samples (default 32; all of a smaller folder or file)")
        p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="sampling and randomness seed")
        p.add_argument("--out", default="build/eval", help="report folder (default build/eval)")
        p.add_argument("--batch-size", type=int, default=32, help="inputs per call in process (default 32)")
        p.add_argument("--sanity", action="store_true", help="add the model-randomisation sanity check (in process)")
        p.add_argument("--sanity-only", action="store_true", help="run the sanity check only")
        p.add_argument("--sanity-n", type=int, default=16, help="inputs of the sanity check (default 16)")
        p.add_argument("--sanity-threshold", type=float, default=DEFAULT_THRESHOLD,
                       help=f"pass when the final mean rank correlation is at most this (default {DEFAULT_THRESHOLD})")
        p.add_argument("--key", help="TorchServe inference key (default: from --key-file)")
        p.add_argument("--key-file", help="TorchServe's key_file.json (default: ./key_file.json if present)")
        p.add_argument("--explain-token", help="value of the X-Explain-Token header")
        p.add_argument("--priority", help="value of the priority header")
        p.add_argument("--priority-header", default="X-Priority", help="name of the priority header")
        p.add_argument("--concurrency", type=int, default=8, help="requests in flight to the server (default 8)")
    image.add_argument("--images", help="a folder of your images (any size; default: synthetic shapes)")
    image.add_argument("--steps", type=int, default=16, help="deletion/insertion steps (default 16)")
    image.add_argument("--random-maps", type=int, default=3, help="random maps per image (default 3)")
    image.add_argument("--image-size", type=int, help="side of the synthetic shapes (default: the model's crop, or 64)")
    image.add_argument("--resize", type=_size, default=256, help="served model's handler.resize (default 256)")
    image.add_argument("--crop", type=_size, default=224, help="served model's handler.crop (default 224)")
    image.add_argument("--model-config", help="served model: read resize and crop from its MAR or config YAML")
    text.add_argument("--texts", help="a text file, one text per line (default: synthetic reviews)")
    text.add_argument("--k", type=int, default=3, help="cue hit@k, synthetic reviews (default 3)")
    text.add_argument("--max-words", type=int, default=5, help="words deleted, at most (default 5)")
    text.add_argument("--random-repeats", type=int, default=3, help="random deletion orders per text (default 3)")
    return parser


def served_preprocessing(args):
    """The served model's resize and crop: from ``--model-config`` (a MAR or YAML), else the flags."""
    from ..serving.images import Preprocessing
    from ..serving.settings import ImageModelSettings

    handler = {"resize": args.resize, "crop": args.crop}
    if args.model_config:
        path = Path(args.model_config)
        try:
            if path.suffix == ".mar":
                import zipfile

                with zipfile.ZipFile(path) as archive:
                    manifest = yaml.safe_load(archive.read("MAR-INF/MANIFEST.json"))
                    config = yaml.safe_load(archive.read(manifest["model"]["configFile"])) or {}
            else:
                config = yaml.safe_load(path.read_text()) or {}
        except (OSError, KeyError, ValueError, yaml.YAMLError) as exc:
            raise EvaluationError(f"{path}: no model config to read ({type(exc).__name__}: {exc})") from None
        section = config.get("handler") or {}
        handler = {"resize": section.get("resize", ImageModelSettings.resize),
                   "crop": section.get("crop", ImageModelSettings.crop)}
    return Preprocessing(handler["resize"], handler["crop"])


def _backend(args):
    if args.url:
        if not args.model:
            raise EvaluationError("--url needs --model")
        if args.sanity or args.sanity_only:
            raise EvaluationError(NO_WEIGHTS)
        key = read_inference_key(args.key, args.key_file)
        options = (args.explain_token, args.priority, args.priority_header, args.concurrency)
        if args.task == "image":
            return ServedImage(args.url, args.model, key, *options, preprocessing=served_preprocessing(args))
        return ServedText(args.url, args.model, key, *options)
    if args.mar:
        from .eval_mar import MarImage, MarText

        return (MarImage if args.task == "image" else MarText)(args.mar, args.batch_size)
    return (InProcessImage if args.task == "image" else InProcessText)(args.model_dir, args.batch_size)


def _check_numbers(args) -> None:
    names = ("n", "batch_size", "concurrency", "sanity_n") + (
        ("steps", "random_maps") if args.task == "image" else ("k", "max_words", "random_repeats"))
    for name in names:
        if getattr(args, name) < 1:
            raise EvaluationError(f"--{name.replace('_', '-')} must be >= 1")


def run(args) -> dict:
    _check_numbers(args)
    backend = _backend(args)
    try:
        return _run(args, backend)
    finally:
        if hasattr(backend, "close"):
            backend.close()


def _run(args, backend) -> dict:
    began = time.perf_counter()
    notes = list(f"the MAR's packed serving code differs from this installation's ({f}); in process the "
                 "installed code ran" for f in getattr(backend, "code_differs", [])[:3])
    curves = not args.sanity_only
    n = args.n if curves else min(args.n, args.sanity_n)
    extra: dict = {}
    if args.task == "image":
        if args.images:
            views, skipped = data.user_images(args.images, n, args.seed, backend.preprocessing)
            notes += [f"skipped {s}" for s in skipped]
            described = f"{len(views)} images from {args.images}"
        else:
            crop = backend.preprocessing.crop
            size = args.image_size or getattr(backend, "image_size", None) or (crop if isinstance(crop, int) else 64)
            views = data.synthetic_images(n, args.seed, size, backend.preprocessing)
            described = f"{len(views)} synthetic shapes of {size}x{size} pixels (seed {args.seed})"
        extra["geometry"] = check_geometry(backend, views, notes)
        report = (evaluate_images(backend, args.method, views, args.seed, args.steps, args.random_maps,
                                  args.batch_size) if curves else {})
        sanity_inputs = data.frames(views[:args.sanity_n])
    else:
        samples = None
        if args.texts:
            texts = data.user_texts(args.texts, n, args.seed)
            described = f"{len(texts)} texts from {args.texts}"
        else:
            samples = data.synthetic_texts(n, args.seed)
            texts = [s.text for s in samples]
            described = f"{len(texts)} synthetic reviews (seed {args.seed})"
        report = (evaluate_text(backend, args.method, texts, args.seed, args.k, args.max_words, args.random_repeats,
                                args.batch_size, samples) if curves else {})
        sanity_inputs = texts[:args.sanity_n]
    if not curves:
        report = {"task": args.task, "method": args.method, "settings": {"n": n, "seed": args.seed}}
    if args.sanity or args.sanity_only:
        report["sanity"] = run_sanity(backend, args.task, sanity_inputs, args.method, args.seed,
                                      args.sanity_threshold)
    report["method"] = report.get("method") or report.get("sanity", {}).get("method") or args.method
    report.update(extra, data=described, notes=notes, backend=backend.description,
                  elapsed_s=round(time.perf_counter() - began, 2), date=datetime.date.today().isoformat(),
                  machine=f"{platform.machine()}, {platform.system()}, python {platform.python_version()}, "
                          f"{torch.get_num_threads()} threads")
    return report


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        report = run(args)
    except (EvaluationError, data.DataError) as exc:
        print(f"tsexplain-eval: error: {exc}", file=sys.stderr)
        return 2
    paths = write_report(report, Path(args.out))
    print(f"{report['task']} explanations, method {report['method']}: {report['data']} "
          f"({report['backend']}, {report['elapsed_s']:.1f} s)")
    for note in report["notes"]:
        print(f"note: {note}")
    print(format_table(report))
    print("report: " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
