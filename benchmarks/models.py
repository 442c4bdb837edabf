"""The benchmarked models, each served twice: by our handler and by TorchServe's stock one.

Every model is staged as unzipped model directories (``torch-model-archiver
--archive-format no-archive``) in one model store, in five variants on the same
weights: ``<name>`` and ``<name>_stock`` with ``batchSize: 1`` (sequential
latency at batch 1), ``<name>_b8`` and ``<name>_stock_b8`` with batching
(concurrent load), and ``<name>_async``, ours with ``asyncCommunication`` (the worker
batches itself and explains in a lane of its own), for the under-load comparison. Weights are made here with a fixed seed (ResNet-50 and BERT-base
random, the demo models trained) so nothing is downloaded.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
STOCK = Path(__file__).resolve().parent / "stock_handlers"
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

import build_mar  # noqa: E402

EXPLAIN_TOKEN_ENV = "TSEXPLAIN_BENCH_TOKEN"
# Priority traffic with a token (#4's setting); the explanation cache off, so that every explanation
# is computed (the benchmark repeats a few inputs).
OURS_EXPLAIN = {"policy": "priority", "token_env": EXPLAIN_TOKEN_ENV, "on_denied": "predict", "cache_mb": 0}
BATCHED = {"batchSize": 8, "maxBatchDelay": 10}
SINGLE = {"batchSize": 1, "maxBatchDelay": 1}
# TorchServe hands each request over as it arrives; the handler batches like BATCHED (explain.async_*)
ASYNC = {"batchSize": 1, "maxBatchDelay": 1, "asyncCommunication": True}
WORKERS = {"minWorkers": 1, "maxWorkers": 1, "responseTimeout": 600}
RESNET_BLOCKS = {"resnet18": ("BasicBlock", [2, 2, 2, 2]), "resnet34": ("BasicBlock", [3, 4, 6, 3]),
                 "resnet50": ("Bottleneck", [3, 4, 6, 3])}


@dataclass
class Model:
    """A model staged in ``store`` in its variants, with its request inputs."""

    name: str
    kind: str  # "image" or "text"
    description: str
    inputs: list = field(default_factory=list)  # image bytes or texts
    content_type: str = "application/octet-stream"
    tokens: int | None = None  # text length in tokens, specials included

    @property
    def concurrent(self) -> str:
        """Our variant with ``asyncCommunication``: explanations in a lane of their own."""
        return f"{self.name}_async"

    def variants(self) -> dict[str, str]:
        names = [self.name, f"{self.name}_stock", f"{self.name}_b8", f"{self.name}_stock_b8", self.concurrent]
        return {n: n for n in names}

    def body(self, i: int, stock: bool, explain: bool) -> tuple[bytes, str]:
        """Request body and content type of input ``i`` for one handler."""
        data = self.inputs[i % len(self.inputs)]
        if self.kind == "image":
            return data, self.content_type
        if stock:  # the stock HF handler reads a Python literal (captum_explanation: true)
            return repr({"text": data, "target": 0}).encode(), "text/plain; charset=utf-8"
        return data.encode(), "text/plain; charset=utf-8"


def archive(name: str, handler: str, export: Path, config: dict, extra: Path | None = None, **files: Path) -> Path:
    """An unzipped model directory ``export/name`` (fast to make, served as is)."""
    stage_dir = build_mar.BUILD / "bench-config"
    stage_dir.mkdir(parents=True, exist_ok=True)
    config_path = stage_dir / f"{name}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    archiver = Path(sys.executable).parent / "torch-model-archiver"
    command = [str(archiver) if archiver.exists() else "torch-model-archiver", "--model-name", name,
               "--version", "1.0", "--handler", handler, "--config-file", str(config_path),
               "--export-path", str(export), "--archive-format", "no-archive", "--force"]
    if extra is not None:
        command += ["--extra-files", str(extra)]
    for flag, path in files.items():
        command += [f"--{flag.replace('_', '-')}", str(path)]
    export.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(export / name, ignore_errors=True)
    subprocess.run(command, check=True)
    return export / name


def batched_copy(model_dir: Path, config: dict, suffix: str = "_b8") -> Path:
    """``<model_dir><suffix>``: the same files (hard links) with a batching config."""
    target = model_dir.with_name(model_dir.name + suffix)
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(model_dir, target, copy_function=os.link)
    manifest = json.loads((target / "MAR-INF" / "MANIFEST.json").read_text())
    manifest["model"]["modelName"] = target.name
    (target / "MAR-INF" / "MANIFEST.json").unlink()
    (target / "MAR-INF" / "MANIFEST.json").write_text(json.dumps(manifest, indent=2))
    config_file = target / manifest["model"]["configFile"]
    config_file.unlink()
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    return target


def stage_pair(name: str, export: Path, ours: dict, stock: dict) -> None:
    """Both handlers in both batching variants. ``ours``/``stock``: archive() arguments."""
    for model_name, spec in ((name, ours), (f"{name}_stock", stock)):
        base = {**WORKERS, **spec.pop("config")}
        model_dir = archive(model_name, config={**base, **SINGLE}, export=export, **spec)
        batched_copy(model_dir, {**base, **BATCHED})
        if model_name == name:  # ours again, served concurrently
            explain = {**base.get("explain", {}), "async_batch_size": BATCHED["batchSize"],
                       "async_max_batch_delay_ms": BATCHED["maxBatchDelay"]}
            batched_copy(model_dir, {**base, **ASYNC, "explain": explain}, "_async")


def stage_image(name: str, export: Path, architecture: str, weights: Path, labels: Path, image_size: int,
                target_layer: str | None) -> None:
    block, layers = RESNET_BLOCKS[architecture]
    num_classes = len(json.loads(labels.read_text()))
    work = build_mar.BUILD / f"bench-{name}"
    work.mkdir(parents=True, exist_ok=True)
    model_file = work / "model.py"  # the stock handler's model file, as in TorchServe's resnet examples
    model_file.write_text(
        f"from torchvision.models.resnet import ResNet, {block}\n\n\n"
        f"class StockResNet(ResNet):\n    def __init__(self):\n"
        f"        super().__init__({block}, {layers}, num_classes={num_classes})\n")
    explain = dict(OURS_EXPLAIN, **({"target_layer": target_layer} if target_layer else {}))
    # the stock handler's geometry: image_classifier resizes to 256 and crops 224; the sized one
    # resizes and crops to image_size
    stock_sized = image_size != 224
    ours_config = {"handler": {"architecture": architecture, "num_classes": num_classes,
                               "resize": image_size if stock_sized else 256, "crop": image_size},
                   "explain": explain}
    extra, _ = build_mar.stage(name, {"index_to_name.json": labels}, {})
    stock_handler = str(STOCK / "image_classifier_sized.py") if stock_sized else "image_classifier"
    stage_pair(name, export,
               ours=dict(handler=str(ROOT / "handlers" / "image_explainer.py"), extra=extra, config=ours_config,
                         model_file=ROOT / "handlers" / "named_model.py", serialized_file=weights),
               stock=dict(handler=stock_handler, extra=labels, config={"image_size": image_size},
                          model_file=model_file, serialized_file=weights))


def stage_text(name: str, export: Path, hf_dir: Path, max_length: int) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    labels = build_mar.BUILD / f"bench-{name}" / "index_to_name.json"
    labels.parent.mkdir(parents=True, exist_ok=True)
    labels.write_text(json.dumps({str(k): v for k, v in config["id2label"].items()}))
    stock_extra = build_mar.BUILD / f"bench-{name}" / "stock-extra"
    shutil.rmtree(stock_extra, ignore_errors=True)
    shutil.copytree(hf_dir, stock_extra, ignore=shutil.ignore_patterns("model.safetensors"))
    shutil.copy2(labels, stock_extra)
    extra, _ = build_mar.stage(name, {"hf_model": hf_dir}, {})
    stock_config = {"handler": {"mode": "sequence_classification", "do_lower_case": True, "max_length": max_length,
                                "captum_explanation": True, "embedding_name": "bert"}}
    stage_pair(name, export,
               ours=dict(handler=str(ROOT / "handlers" / "text_explainer.py"), extra=extra,
                         config={"handler": {"max_length": max_length}, "explain": dict(OURS_EXPLAIN)}),
               stock=dict(handler=str(STOCK / "transformer_seq_classifier.py"), extra=stock_extra,
                          config=stock_config, serialized_file=hf_dir / "model.safetensors"))


def image_inputs(n: int, size: int, fmt: str) -> list[bytes]:
    from tsexplain.tools.synthetic import shapes

    out = []
    for sample in shapes.generate(n, 4242, size):
        buffer = io.BytesIO()
        sample.image.convert("RGB").save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        out.append(buffer.getvalue())
    return out


def text_inputs(n: int, tokenizer, tokens: int, seed: int = 4242) -> list[str]:
    """``n`` synthetic reviews of exactly ``tokens`` tokens with [CLS] and [SEP] (so that the
    stock handler, which pads to max_length, and ours, which pads to the longest, do the same work)."""
    from tsexplain.tools.synthetic import reviews

    words = " ".join(s.text for s in reviews.generate(40 * n + 40, seed)).split()
    out, start = [], 0
    for _ in range(n):
        text, end = "", start
        while True:
            candidate = " ".join(words[start:end + 1])
            if len(tokenizer.encode(candidate, add_special_tokens=False)) > tokens - 2:
                break
            text, end = candidate, end + 1
        while len(tokenizer.encode(text, add_special_tokens=False)) < tokens - 2:
            text += " ."
        out.append(text)
        start = end + 1
    return out


def demo_shapes(export: Path, n_inputs: int) -> Model:
    demo = ROOT / "build" / "demo" / "shapes"
    training = json.loads((demo / "training.json").read_text())
    size = training["image_size"]
    stage_image("shapes", export, training["architecture"], demo / "weights.pt", demo / "index_to_name.json",
                size, training["target_layer"])
    return Model("shapes", "image", f"demo {training['architecture']}, {size}x{size} PNG, Grad-CAM on "
                 f"{training['target_layer']}", image_inputs(n_inputs, size, "PNG"), "image/png")


def demo_reviews(export: Path, n_inputs: int) -> Model:
    from transformers import AutoTokenizer

    demo = ROOT / "build" / "demo" / "reviews"
    tokens = json.loads((demo / "config.json").read_text())["max_position_embeddings"]
    stage_text("reviews", export, demo, tokens)
    tokenizer = AutoTokenizer.from_pretrained(demo, local_files_only=True)
    return Model("reviews", "text", f"demo tiny BERT (2 layers, hidden 64), {tokens} tokens",
                 text_inputs(n_inputs, tokenizer, tokens), tokens=tokens)


def resnet50(export: Path, n_inputs: int) -> Model:
    import torch
    import torchvision

    work = build_mar.BUILD / "bench-resnet50"
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    weights, labels = work / "weights.pt", work / "index_to_name.json"
    torch.save(torchvision.models.resnet50(weights=None, num_classes=1000).state_dict(), weights)
    labels.write_text(json.dumps({str(i): f"class_{i}" for i in range(1000)}))
    stage_image("resnet50", export, "resnet50", weights, labels, 224, None)
    return Model("resnet50", "image", "ResNet-50, random weights (seed 0), 224x224 JPEG, Grad-CAM on layer4",
                 image_inputs(n_inputs, 224, "JPEG"), "image/jpeg")


def bert_base(export: Path, n_inputs: int, tokens: int = 128) -> Model:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from demo.train_reviews import train_tokenizer
    from tsexplain.tools.synthetic import reviews

    hf_dir = build_mar.BUILD / "bench-bert-base" / "hf"
    shutil.rmtree(hf_dir, ignore_errors=True)
    corpus = [s.text for s in reviews.generate(3000, 7)]
    tokenizer = train_tokenizer(corpus, {"vocab_size": 4000, "max_length": 512})
    torch.manual_seed(0)
    config = BertConfig(num_labels=2, id2label={0: "negative", 1: "positive"},
                        label2id={"negative": 0, "positive": 1}, pad_token_id=tokenizer.pad_token_id)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    stage_text("bert-base", export, hf_dir, tokens)
    return Model("bert-base", "text", f"BERT-base (BertConfig defaults), random weights (seed 0), {tokens} tokens",
                 text_inputs(n_inputs, tokenizer, tokens), tokens=tokens)


BUILDERS = {"shapes": demo_shapes, "reviews": demo_reviews, "resnet50": resnet50, "bert-base": bert_base}
