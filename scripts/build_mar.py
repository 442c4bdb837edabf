"""Build self-contained MARs with torch-model-archiver (see build_mar.sh --help).

Each MAR holds the handler, ``ts_glue.py``, the serving code of the ``tsexplain``
package (``tsexplain/attr`` and ``tsexplain/serving``; the tools stay out), the
labels and a model config YAML with the explanation settings, so it serves on a
machine without this repository.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build" / "mar"
SERVING_PACKAGES = ("attr", "serving")  # what a worker imports from tsexplain; tools/ stays out of MARs
SERVING_DEFAULTS = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 10, "responseTimeout": 120}


def deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def stage(name: str, files: dict[str, Path], config: dict) -> tuple[Path, Path]:
    """A folder whose contents go to the MAR's root, and the config YAML."""
    stage_dir = BUILD / name
    shutil.rmtree(stage_dir, ignore_errors=True)
    extra = stage_dir / "extra"
    extra.mkdir(parents=True)
    package = extra / "tsexplain"
    package.mkdir()
    shutil.copy2(ROOT / "tsexplain" / "__init__.py", package)
    for name in SERVING_PACKAGES:
        shutil.copytree(ROOT / "tsexplain" / name, package / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "handlers" / "ts_glue.py", extra)
    for target, source in files.items():
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, extra / target)
    config_path = stage_dir / "model-config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return extra, config_path


def archive(name: str, version: str, handler: str, extra: Path, config: Path, export: Path, **optional: Path) -> Path:
    export.mkdir(parents=True, exist_ok=True)
    command = [
        "torch-model-archiver", "--model-name", name, "--version", version,
        "--handler", str(ROOT / "handlers" / handler), "--extra-files", str(extra),
        "--config-file", str(config), "--export-path", str(export), "--force",
    ]
    for flag, path in optional.items():
        command += [f"--{flag.replace('_', '-')}", str(path)]
    archiver = Path(sys.executable).parent / "torch-model-archiver"
    if archiver.exists():
        command[0] = str(archiver)
    # torch-model-archiver stages files in $TMPDIR/<model name>: a private TMPDIR keeps
    # builds of the same name in parallel (other checkouts, tests) from mixing their files.
    with tempfile.TemporaryDirectory(prefix="mar-") as private_tmp:
        subprocess.run(command, check=True, env={**os.environ, "TMPDIR": private_tmp})
    mar = export / f"{name}.mar"
    print(f"built {mar} ({mar.stat().st_size / 1e6:.1f} MB)")
    return mar


def load_user_config(path: str | None) -> dict:
    if not path:
        return {}
    config = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(config, dict):
        raise SystemExit(f"{path}: expected a YAML mapping")
    return config


def build_image(args) -> Path:
    labels = json.loads(Path(args.labels).read_text())
    weights = Path(args.weights) if args.weights else None
    if args.pretrained:
        weights = fetch_pretrained(args.architecture, args.pretrained)
    if weights is None:
        raise SystemExit("image: give --weights FILE (a state dict) or --pretrained WEIGHTS_NAME")
    check_weights(args.architecture, len(labels), weights)
    config = deep_merge(
        {**SERVING_DEFAULTS, "handler": {"architecture": args.architecture, "num_classes": len(labels)}, "explain": {}},
        load_user_config(args.config),
    )
    check_settings("image", args.name, config)
    extra, config_path = stage(args.name, {"index_to_name.json": Path(args.labels)}, config)
    return archive(
        args.name, args.version, "image_explainer.py", extra, config_path, Path(args.export_path),
        model_file=ROOT / "handlers" / "torchvision_model.py", serialized_file=weights,
    )


def check_weights(architecture: str, num_classes: int, weights: Path) -> None:
    """Fail at build time, not on the server, when the weights don't fit."""
    sys.path.insert(0, str(ROOT))
    from tsexplain.serving.errors import ConfigError
    from tsexplain.serving.models import build_torchvision_classifier

    try:
        build_torchvision_classifier(architecture, num_classes, str(weights))
    except ConfigError as exc:
        raise SystemExit(f"{weights}: {exc} (the labels file has {num_classes} classes)") from None


def check_settings(modality: str, name: str, config: dict) -> None:
    """Fail at build time, not when the model loads, on settings the handlers would refuse
    (as at load, without the serving machine's environment: an audit sink left to
    TSEXPLAIN_AUDIT_SINK there is not required here)."""
    sys.path.insert(0, str(ROOT))
    from tsexplain.serving.errors import ConfigError
    from tsexplain.serving.settings import load_settings

    audit = (config.get("explain") or {}).get("audit")
    environ = {"TSEXPLAIN_AUDIT_SINK": "sqlite:///set/where/served.db"} \
        if isinstance(audit, dict) and audit.get("sink") is None else {}
    try:
        load_settings(modality, config, name, environ)
    except ConfigError as exc:
        raise SystemExit(f"{name}: bad settings in the model config: {exc}") from None


def fetch_pretrained(architecture: str, weights_name: str) -> Path:
    """torchvision's pretrained weights, where this machine can download them."""
    import torch
    import torchvision

    try:
        weights = torchvision.models.get_weight(weights_name)
        state = weights.get_state_dict(progress=False)
    except Exception as exc:  # no network, unknown name, bad checksum
        raise SystemExit(
            f"cannot get torchvision weights {weights_name!r} for {architecture}: {type(exc).__name__}: {exc}\n"
            "This machine may have no access to download.pytorch.org: download the weights elsewhere "
            "and pass them with --weights FILE."
        ) from None
    path = BUILD / f"{architecture}-{weights_name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def build_text(args) -> Path:
    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").exists():
        raise SystemExit(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    config = deep_merge({**SERVING_DEFAULTS, "handler": {}, "explain": {}}, load_user_config(args.config))
    check_settings("text", args.name, config)
    extra, config_path = stage(args.name, {"hf_model": model_dir}, config)
    return archive(args.name, args.version, "text_explainer.py", extra, config_path, Path(args.export_path))


def build_demo(args) -> list[Path]:
    demo = ROOT / "build" / "demo"
    mars = []
    shapes = demo / "shapes"
    if (shapes / "weights.pt").exists():
        training = json.loads((shapes / "training.json").read_text())
        image_config = {"handler": {"resize": training["image_size"], "crop": training["image_size"]},
                        "explain": {"target_layer": training["target_layer"]}}
        config_path = BUILD / "shapes-config.yaml"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(yaml.safe_dump(image_config))
        mars.append(build_image(argparse.Namespace(
            name="shapes", version="1.0", architecture=training["architecture"], weights=shapes / "weights.pt",
            pretrained=None, labels=shapes / "index_to_name.json", config=config_path, export_path=args.export_path,
        )))
    else:
        raise SystemExit(f"{shapes}: no trained demo model; run python -m demo.train_shapes first")
    reviews = demo / "reviews"
    if (reviews / "config.json").exists():
        mars.append(build_text(argparse.Namespace(
            name="reviews", version="1.0", model_dir=reviews, config=None, export_path=args.export_path,
        )))
    return mars


def main(argv=None):
    parser = argparse.ArgumentParser(prog="build_mar.sh", description=__doc__)
    sub = parser.add_subparsers(dest="kind", required=True)
    demo = sub.add_parser("demo", help="package the trained demo models (shapes.mar, reviews.mar)")
    image = sub.add_parser("image", help="a torchvision classifier: architecture + weights + labels")
    image.add_argument("--name", required=True)
    image.add_argument("--architecture", required=True, help="torchvision builder name, e.g. resnet50")
    image.add_argument("--weights", help="state dict file (.pt/.pth)")
    image.add_argument("--pretrained", help="torchvision weights name, e.g. ResNet50_Weights.IMAGENET1K_V2 (downloads)")
    image.add_argument("--labels", required=True, help="index_to_name.json")
    text = sub.add_parser("text", help="a Hugging Face sequence classifier saved with save_pretrained")
    text.add_argument("--name", required=True)
    text.add_argument("--model-dir", required=True)
    for kind in (image, text):
        kind.add_argument("--version", default="1.0")
        kind.add_argument("--config", help="YAML merged over the defaults (handler:, explain:, TorchServe keys)")
    for kind in (demo, image, text):
        kind.add_argument("--export-path", default=str(ROOT / "model_store"), help="where the .mar goes")
    args = parser.parse_args(argv)
    {"demo": build_demo, "image": build_image, "text": build_text}[args.kind](args)


if __name__ == "__main__":
    main()
