"""Build self-contained MARs with torch-model-archiver, checked before they are archived
(see build_mar.sh --help and README, "Packaging your own models").

Each MAR holds the handler, ``ts_glue.py``, the serving code of the ``tsexplain``
package (``tsexplain/attr`` and ``tsexplain/serving``; the tools stay out), the model's
files, the labels and a model config YAML with the explanation settings, so it serves
on a machine without this repository. Before archiving, the MAR's files are loaded and
explained as the worker will (``tsexplain.serving.probe.check_model``: the same settings
validation, the same loader, the same runner and flow): a MAR that builds, loads. A
problem the user can fix stops the build with one line and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tsexplain.serving.errors import ConfigError  # noqa: E402
from tsexplain.serving.schema import IMAGE, TEXT  # noqa: E402

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no progress bars from loading HF models
os.environ.setdefault("TQDM_DISABLE", "1")
BUILD = ROOT / "build" / "mar"
SERVING_PACKAGES = ("attr", "serving")  # what a worker imports from tsexplain; tools/ stays out of MARs
SERVING_DEFAULTS = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 10, "responseTimeout": 120}
HANDLERS = {IMAGE: "image_explainer.py", TEXT: "text_explainer.py"}
LABELS = "index_to_name.json"
HF_FOLDER = "hf_model"
# TorchScript models have no hooks: input IG is what they explain (docs/design.md, "Loading and packaging")
TORCHSCRIPT_EXPLAIN = {"method": "integrated_gradients", "methods": ["integrated_gradients"]}


class BuildError(Exception):
    """A problem with the build's arguments or files: one line, exit status 2."""


def deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def write_serving_code(extra: Path) -> None:
    """``extra/ts_glue.py`` and ``extra/tsexplain/`` (its attr and serving packages): what a
    MAR's root needs besides the handler. ``--extra-files`` copies a folder's *contents*
    to the MAR's root, so it is given ``extra``, the folder that holds ``tsexplain/``."""
    package = extra / "tsexplain"
    package.mkdir(parents=True)
    shutil.copy2(ROOT / "tsexplain" / "__init__.py", package)
    for name in SERVING_PACKAGES:
        shutil.copytree(ROOT / "tsexplain" / name, package / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "handlers" / "ts_glue.py", extra)


def stage(name: str, files: dict[str, Path], config: dict) -> tuple[Path, Path]:
    """A folder whose contents go to the MAR's root (``files``: {name in the MAR: source};
    weights are hard-linked where possible), and the config YAML."""
    stage_dir = BUILD / name
    shutil.rmtree(stage_dir, ignore_errors=True)
    extra = stage_dir / "extra"
    write_serving_code(extra)
    for target, source in files.items():
        if source.is_dir():
            shutil.copytree(source, extra / target)
        else:
            try:
                os.link(source, extra / target)
            except OSError:
                shutil.copy2(source, extra / target)
    config_path = stage_dir / "model-config.yaml"
    write_config(config_path, config)
    return extra, config_path


def serving_defaults(user_config: dict) -> dict:
    """TorchServe's keys unless the user's config sets them: with ``asyncCommunication``
    the frontend's batchSize must be 1 (the worker batches requests itself)."""
    defaults = dict(SERVING_DEFAULTS)
    if user_config.get("asyncCommunication") is True:
        defaults["batchSize"] = 1
    return defaults


def write_config(path: Path, config: dict) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def archive(name: str, version: str, handler: str, extra: Path, config: Path, export: Path, **optional: Path) -> Path:
    """torch-model-archiver into ``export``; ``optional``: model_file, serialized_file, requirements_file."""
    export.mkdir(parents=True, exist_ok=True)
    command = [
        "torch-model-archiver", "--model-name", name, "--version", version,
        "--handler", str(ROOT / "handlers" / handler), "--extra-files", str(extra),
        "--config-file", str(config), "--export-path", str(export), "--force",
    ]
    for flag, path in optional.items():
        if path is not None:
            command += [f"--{flag.replace('_', '-')}", str(path)]
    archiver = Path(sys.executable).parent / "torch-model-archiver"
    if archiver.exists():
        command[0] = str(archiver)
    # torch-model-archiver stages files in $TMPDIR/<model name>: a private TMPDIR keeps
    # builds of the same name in parallel (other checkouts, tests) from mixing their files.
    with tempfile.TemporaryDirectory(prefix="mar-") as private_tmp:
        subprocess.run(command, check=True, env={**os.environ, "TMPDIR": private_tmp})
    return export / f"{name}.mar"


def load_user_config(path: str | None) -> dict:
    if not path:
        return {}
    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise BuildError(f"{path}: {exc}") from None
    if not isinstance(config, dict):
        raise BuildError(f"{path}: expected a YAML mapping")
    return config


def existing(path: str | None, what: str) -> Path | None:
    if path is None:
        return None
    if not Path(path).exists():
        raise BuildError(f"{what} {path}: no such file or folder")
    return Path(path)


def read_labels(path: Path) -> dict:
    """index_to_name.json, read by TorchServe's own reader (what the worker's BaseHandler uses)."""
    from ts.utils.util import load_label_mapping

    try:
        mapping = load_label_mapping(str(path))
    except Exception as exc:  # noqa: BLE001 - TorchServe raises bare Exception for a bad mapping
        raise BuildError(f"{path}: {exc}") from None
    if not mapping:
        raise BuildError(f"{path}: no labels")
    return mapping


def check(modality: str, name: str, extra: Path, manifest_model: dict, config: dict):
    """The MAR's files loaded and explained as the worker will (tsexplain.serving.probe)."""
    from tsexplain.serving.probe import check_model

    mapping = read_labels(extra / LABELS) if (extra / LABELS).exists() else None
    report = check_model(modality, extra, manifest_model, config, name, mapping, environ=server_only_stand_ins(config))
    where = f", layer {report.layer}" if report.layer else (" (TorchScript: no layer)" if modality == IMAGE else "")
    print(f"checked {name}: {len(report.labels)} classes{where}; a probe input explained with "
          f"{', '.join(report.methods)}")
    return report


def server_only_stand_ins(config: dict) -> dict:
    """Stand-ins for settings that only the serving machine's environment gives: an audit
    trail's sink may be left to ``TSEXPLAIN_AUDIT_SINK`` there (docs/audit.md)."""
    audit = (config.get("explain") or {}).get("audit")
    if isinstance(audit, dict) and audit.get("sink") is None:
        return {"TSEXPLAIN_AUDIT_SINK": "sqlite:///set/where/served.db"}
    return {}


def image_kind(args) -> str:
    kinds = [k for k in ("architecture", "timm", "model_file", "hf_model_dir", "torchscript") if getattr(args, k)]
    if len(kinds) != 1:
        raise BuildError("image: give one of --architecture, --timm, --model-file, --hf-model-dir, --torchscript"
                         + (f" (got {', '.join('--' + k.replace('_', '-') for k in kinds)})" if kinds else ""))
    return kinds[0]


def build_image(args) -> Path:
    """An image classifier MAR, from any of the kinds of ``image_kind``."""
    kind = image_kind(args)
    user_config = load_user_config(args.config)
    handler: dict = {}
    explain: dict = {}
    files: dict[str, Path] = {}
    model_file = serialized = None
    weights = existing(args.weights, "--weights")
    if args.pretrained:
        if kind != "architecture":
            raise BuildError("--pretrained goes with --architecture (torchvision weights)")
        weights = fetch_pretrained(args.architecture, args.pretrained)
    if kind in ("architecture", "timm"):
        if weights is None:
            raise BuildError(f"--{kind}: give --weights FILE (a state dict)"
                             + (" or --pretrained WEIGHTS_NAME" if kind == "architecture" else ""))
        handler = {kind: getattr(args, kind)}
        model_file, serialized = ROOT / "handlers" / "named_model.py", weights
    elif kind == "model_file":
        model_file, serialized = existing(args.model_file, "--model-file"), weights
    elif kind == "hf_model_dir":
        folder = existing(args.hf_model_dir, "--hf-model-dir")
        if not (folder / "config.json").exists():
            raise BuildError(f"{folder}: not a Hugging Face model directory (no config.json)")
        from tsexplain.serving.models import hf_labels, image_processor_settings

        preprocessing, warnings = image_processor_settings(folder)
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        handler = {"model_path": HF_FOLDER, **preprocessing}
        files[HF_FOLDER] = folder
        model_file = ROOT / "handlers" / "named_model.py"
        if args.labels is None:
            labels = BUILD / f"{args.name}-labels.json"
            labels.parent.mkdir(parents=True, exist_ok=True)
            labels.write_text(json.dumps(hf_labels(folder)))
            args.labels = str(labels)
    else:  # torchscript: BaseHandler loads a serialized file ending in .pt with torch.jit.load
        source = existing(args.torchscript, "--torchscript")
        serialized = source if source.suffix == ".pt" else None
        if serialized is None:
            serialized = BUILD / f"{args.name}-torchscript" / (source.stem + ".pt")
            serialized.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, serialized)
        explain = dict(TORCHSCRIPT_EXPLAIN)
    labels = existing(args.labels, "--labels")
    if labels is None:
        raise BuildError("image: give --labels index_to_name.json")
    mapping = read_labels(labels)
    if kind in ("architecture", "timm"):
        handler["num_classes"] = len(mapping)
    files[LABELS] = labels
    for path in (args.extra_files or "").split(","):
        if path:
            source = existing(path, "--extra-files")
            files[source.name] = source
    config = deep_merge({**serving_defaults(user_config), "handler": handler, "explain": explain}, user_config)
    manifest_model = {}
    if model_file is not None:
        files[model_file.name] = model_file
        manifest_model["modelFile"] = model_file.name
    if serialized is not None:
        files[serialized.name] = serialized
        manifest_model["serializedFile"] = serialized.name
    extra, config_path = stage(args.name, files, config)
    try:
        report = check(IMAGE, args.name, extra, manifest_model, config)
    except ConfigError as exc:
        if kind in ("architecture", "timm") and "do not fit" in str(exc):
            raise ConfigError(f"{exc} (num_classes comes from the labels file: {len(mapping)} classes)") from None
        raise
    requirements = requirements_file(args, extra.parent, needs_timm=kind == "timm" or report.uses_timm)
    if requirements is not None and "useVenv" not in config:
        config["useVenv"] = True  # see requirements_file
        write_config(config_path, config)
    return finish(args, HANDLERS[IMAGE], extra, config_path, model_file=extra / model_file.name if model_file else None,
                  serialized_file=extra / serialized.name if serialized else None, requirements_file=requirements)


def requirements_file(args, stage_dir: Path, needs_timm: bool) -> Path | None:
    """The MAR's requirements.txt (TorchServe's per-model dependencies): the user's
    ``--requirements`` and, for a model built from timm, ``timm==<the version it was built
    with>``. TorchServe 0.12 installs them only with ``install_py_dep_per_model=true``;
    the MAR then also sets ``useVenv: true``, because without it 0.12 runs
    ``pip install -t <model dir>``, which ignores what is installed and would put timm's
    dependencies, torch included, into the model's folder, ahead of the server's own."""
    lines = []
    if args.requirements:
        lines += [line for line in existing(args.requirements, "--requirements").read_text().splitlines() if line.strip()]
    if needs_timm and not any(line.split("=")[0].split("[")[0].strip().lower() == "timm" for line in lines):
        import timm

        lines.append(f"timm=={timm.__version__}")
    if not lines:
        return None
    path = stage_dir / "requirements.txt"
    path.write_text("\n".join(lines) + "\n")
    print(f"requirements: {', '.join(lines)} (installed per model with install_py_dep_per_model=true and useVenv)")
    return path


def finish(args, handler: str, extra: Path, config_path: Path, **optional) -> Path:
    """Archive into a private folder, then move the MAR into ``--export-path``: a failed
    build leaves no MAR behind."""
    export = Path(args.export_path)
    with tempfile.TemporaryDirectory(prefix="mar-out-") as private:
        built = archive(args.name, args.version, handler, extra, config_path, Path(private), **optional)
        export.mkdir(parents=True, exist_ok=True)
        mar = Path(shutil.move(str(built), export / built.name))
    print(f"built {mar} ({mar.stat().st_size / 1e6:.1f} MB)")
    return mar


def fetch_pretrained(architecture: str, weights_name: str) -> Path:
    """torchvision's pretrained weights, where this machine can download them."""
    import torch
    import torchvision

    try:
        weights = torchvision.models.get_weight(weights_name)
        state = weights.get_state_dict(progress=False)
    except Exception as exc:  # noqa: BLE001 - no network, unknown name, bad checksum
        raise BuildError(
            f"cannot get torchvision weights {weights_name!r} for {architecture}: {type(exc).__name__}: {exc}. "
            "This machine may have no access to download.pytorch.org: download the weights elsewhere "
            "and pass them with --weights FILE."
        ) from None
    path = BUILD / f"{architecture}-{weights_name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def build_text(args) -> Path:
    model_dir = existing(args.model_dir, "--model-dir")
    if not (model_dir / "config.json").exists():
        raise BuildError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    user_config = load_user_config(args.config)
    config = deep_merge({**serving_defaults(user_config), "handler": {}, "explain": {}}, user_config)
    extra, config_path = stage(args.name, {HF_FOLDER: model_dir}, config)
    check(TEXT, args.name, extra, {}, config)
    return finish(args, HANDLERS[TEXT], extra, config_path)


def build_demo(args) -> list[Path]:
    demo = ROOT / "build" / "demo"
    mars = []
    shapes = demo / "shapes"
    if not (shapes / "weights.pt").exists():
        raise BuildError(f"{shapes}: no trained demo model; run python -m demo.train_shapes first")
    training = json.loads((shapes / "training.json").read_text())
    image_config = {"handler": {"resize": training["image_size"], "crop": training["image_size"]},
                    "explain": {"target_layer": training["target_layer"]}}
    config_path = BUILD / "shapes-config.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    write_config(config_path, image_config)
    mars.append(main(["image", "--name", "shapes", "--architecture", training["architecture"],
                      "--weights", str(shapes / "weights.pt"), "--labels", str(shapes / LABELS),
                      "--config", str(config_path), "--export-path", args.export_path]))
    reviews = demo / "reviews"
    if (reviews / "config.json").exists():
        mars.append(main(["text", "--name", "reviews", "--model-dir", str(reviews), "--export-path", args.export_path]))
    return mars


def write_code(args) -> Path:
    """The handler code for MARs built with torch-model-archiver directly (README, "By hand"):
    ``OUT/handlers/`` (the handlers and ``named_model.py``) and ``OUT/extra/`` (``ts_glue.py``
    and ``tsexplain/``), the folder to name in ``--extra-files``."""
    out = Path(args.out)
    for part in ("handlers", "extra"):
        shutil.rmtree(out / part, ignore_errors=True)
    (out / "handlers").mkdir(parents=True)
    for name in (*HANDLERS.values(), "named_model.py"):
        shutil.copy2(ROOT / "handlers" / name, out / "handlers")
    write_serving_code(out / "extra")
    print(f"wrote {out}/handlers (--handler, --model-file) and {out}/extra (--extra-files)")
    return out


def check_mar(args) -> Path:
    """Check a MAR built anywhere as build_mar.sh checks its own: unpacked, loaded and explained."""
    mar = existing(args.mar, "MAR")
    with tempfile.TemporaryDirectory(prefix="mar-check-") as folder:
        try:
            with zipfile.ZipFile(mar) as archive_file:
                archive_file.extractall(folder)
            manifest = json.loads((Path(folder) / "MAR-INF" / "MANIFEST.json").read_text())
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise BuildError(f"{mar}: not a model archive ({exc})") from None
        model = manifest.get("model", {})
        modality = {name: kind for kind, name in HANDLERS.items()}.get(Path(model.get("handler", "")).name)
        if modality is None:
            raise BuildError(f"{mar}: its handler {model.get('handler')!r} is not one of {sorted(HANDLERS.values())}")
        config_file = model.get("configFile")
        config = load_user_config(str(Path(folder) / config_file)) if config_file else {}
        check(modality, model.get("modelName", mar.stem), Path(folder), model, config)
    return mar


class _StderrHandler(logging.StreamHandler):
    """Writes to the ``sys.stderr`` of the moment (main() may run many times in one process)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def quiet_logs() -> None:
    """The serving code's warnings as one line each; the flow's per-request lines (the
    probe's answers are checked and reported by ``check``) and the libraries' notices off."""
    logger = logging.getLogger("tsexplain")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("build_mar.sh: %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False
    logging.getLogger("tsexplain.serving.flow").setLevel(logging.CRITICAL)
    for name in ("transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="build_mar.sh", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    demo = sub.add_parser("demo", help="package the trained demo models (shapes.mar, reviews.mar)")
    image = sub.add_parser("image", help="an image classifier: a torchvision or timm name, a model file, a Hugging "
                                         "Face folder or a TorchScript file, with its weights and labels")
    model = image.add_argument_group("the model (one of)")
    model.add_argument("--architecture", help="torchvision builder name, e.g. resnet50 (with --weights or --pretrained)")
    model.add_argument("--timm", help="timm model name, e.g. convnext_tiny (with --weights; needs timm)")
    model.add_argument("--model-file", help="a .py file defining one nn.Module class (TorchServe's convention), "
                                            "with --weights its state dict")
    model.add_argument("--hf-model-dir", help="a Hugging Face image classifier saved with save_pretrained "
                                              "(labels and preprocessing from its configs)")
    model.add_argument("--torchscript", help="a TorchScript file (torch.jit.save)")
    image.add_argument("--weights", help="state dict file (.pt/.pth) for --architecture, --timm, --model-file")
    image.add_argument("--pretrained", help="torchvision weights name, e.g. ResNet50_Weights.IMAGENET1K_V2 (downloads)")
    image.add_argument("--labels", help="index_to_name.json (default with --hf-model-dir: the model's id2label)")
    image.add_argument("--extra-files", help="comma-separated files the model file imports, put beside it")
    image.add_argument("--requirements", help="a requirements.txt of the model's own Python dependencies")
    text = sub.add_parser("text", help="a Hugging Face sequence classifier saved with save_pretrained")
    text.add_argument("--name", required=True)
    text.add_argument("--model-dir", required=True)
    image.add_argument("--name", required=True)
    for kind in (image, text):
        kind.add_argument("--version", default="1.0")
        kind.add_argument("--config", help="YAML merged over the defaults (handler:, explain:, TorchServe keys)")
    for kind in (demo, image, text):
        kind.add_argument("--export-path", default=str(ROOT / "model_store"), help="where the .mar goes")
    code = sub.add_parser("code", help="write the handler code for torch-model-archiver (README, 'By hand')")
    code.add_argument("--out", required=True)
    checker = sub.add_parser("check", help="load and explain a MAR as a worker would (one built by hand too)")
    checker.add_argument("mar")
    args = parser.parse_args(argv)
    quiet_logs()
    run = {"demo": build_demo, "image": build_image, "text": build_text, "code": write_code, "check": check_mar}
    try:
        return run[args.kind](args)
    except (BuildError, ConfigError) as exc:
        print(f"build_mar.sh: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
