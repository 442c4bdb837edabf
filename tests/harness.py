"""Test helpers: build MARs from weights the tests make, run handlers in process."""
from __future__ import annotations

import importlib
import io
import json
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
import torchvision
import yaml
from PIL import Image
from ts.context import Context, RequestProcessor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import build_mar  # noqa: E402,F401


class RecordingMetrics:
    """Stands in for TorchServe's metrics cache; keeps every call."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        if not name.startswith("add_"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def build_image_mar(tmp: Path, name: str, architecture: str = "resnet18", labels=("cat", "dog", "owl"),
                    config: dict | None = None, seed: int = 0) -> Path:
    """A MAR of ``architecture`` with random weights made here."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(architecture, weights=None, num_classes=len(labels))
    weights, label_file, config_file = tmp / f"{name}.pt", tmp / f"{name}-labels.json", tmp / f"{name}.yaml"
    torch.save(model.state_dict(), weights)
    label_file.write_text(json.dumps({str(i): label for i, label in enumerate(labels)}))
    config_file.write_text(yaml.safe_dump(config or {}))
    build_mar.main(["image", "--name", name, "--architecture", architecture, "--weights", str(weights),
                    "--labels", str(label_file), "--config", str(config_file), "--export-path", str(tmp / "store")])
    return tmp / "store" / f"{name}.mar"


# Python run as on a machine without this repository: no PYTHONPATH, and the editable
# install's finder (which resolves any ``tsexplain.*`` module to the checkout, even a
# submodule missing from a MAR's own ``tsexplain/``) taken off ``sys.meta_path``.
WITHOUT_REPO = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if not getattr("
                "f if isinstance(f, type) else type(f), '__module__', '').startswith('__editable__')]; ")


def without_repo_env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def imports_from_mar_only(mar_dir: Path, modules: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Import ``modules`` with only ``mar_dir`` added to a Python without this repository;
    prints ``ok`` when each came from the MAR and ``tsexplain.tools`` cannot be found."""
    code = WITHOUT_REPO + (
        "sys.path.insert(0, sys.argv[1]); import importlib, importlib.util; "
        f"mods = [importlib.import_module(m) for m in {modules!r}]; "
        "bad = [m.__name__ for m in mods if not m.__file__.startswith(sys.argv[1])]; assert not bad, bad; "
        "assert importlib.util.find_spec('tsexplain.tools') is None; print('ok')")
    return subprocess.run([sys.executable, "-c", code, str(mar_dir)], cwd=cwd, capture_output=True, text=True,
                          env=without_repo_env())


def initializes_from_mar_only(mar_dir: Path, module: str, class_name: str, cwd: Path) -> subprocess.CompletedProcess:
    """Initialize the MAR's handler as TorchServe's worker does (model loaded, runner built),
    in a Python without this repository and with only ``mar_dir`` added; prints ``ok``."""
    code = WITHOUT_REPO + (
        "import json, os; d = sys.argv[1]; sys.path.insert(0, d); import yaml; from ts.context import Context; "
        "m = json.load(open(os.path.join(d, 'MAR-INF', 'MANIFEST.json'))); "
        "config = yaml.safe_load(open(os.path.join(d, m['model']['configFile']))); "
        "c = Context(m['model']['modelName'], d, m, 1, None, '0.12.0', model_yaml_config=config); "
        f"import {module}; h = {module}.{class_name}(); h.initialize(c); import tsexplain, tsexplain.serving.models; "
        "assert tsexplain.serving.models.__file__.startswith(d); print('ok')")
    return subprocess.run([sys.executable, "-c", code, str(mar_dir)], cwd=cwd, capture_output=True, text=True,
                          env=without_repo_env())


def unpack(mar: Path, dest: Path) -> Path:
    with zipfile.ZipFile(mar) as archive:
        archive.extractall(dest)
    return dest


class InProcessHandler:
    """A handler from an unpacked MAR, driven as TorchServe's worker drives it."""

    def __init__(self, model_dir: Path, module: str, class_name: str, env: dict | None = None, monkeypatch=None):
        manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
        yaml_config = yaml.safe_load((model_dir / manifest["model"]["configFile"]).read_text())
        sys.path.insert(0, str(model_dir))
        try:
            handler_module = importlib.import_module(module)
        finally:
            sys.path.remove(str(model_dir))
        self.metrics = RecordingMetrics()
        self.context = Context(manifest["model"]["modelName"], str(model_dir), manifest, 4, None, "0.12.0",
                               metrics=self.metrics, model_yaml_config=yaml_config)
        self.handler = getattr(handler_module, class_name)()
        self.handler.initialize(self.context)

    def __call__(self, requests: list) -> list[tuple[int, object]]:
        """``requests``: (body, headers) pairs; returns (status, decoded JSON) pairs."""
        self.context.request_processor = [RequestProcessor(dict(headers)) for _, headers in requests]
        self.context.request_ids = {i: f"req-{i}" for i in range(len(requests))}
        rows = [{"body": body} for body, _ in requests]
        out = self.handler.handle(rows, self.context)
        assert len(out) == len(requests)
        return [(self.context.get_response_status(i)[0], json.loads(body)) for i, body in enumerate(out)]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


EXPLAIN = {"explain": "True"}


def build_text_mar(tmp: Path, name: str, family: str = "bert", config: dict | None = None,
                   labels=("negative", "neutral", "positive")) -> Path:
    """A MAR of a tiny random Hugging Face classifier saved with save_pretrained."""
    from tiny_hf import tiny_classifier

    model, tokenizer = tiny_classifier(family)
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: i for i, label in enumerate(labels)}
    model_dir, config_file = tmp / f"{name}-hf", tmp / f"{name}.yaml"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config_file.write_text(yaml.safe_dump(config or {}))
    build_mar.main(["text", "--name", name, "--model-dir", str(model_dir), "--config", str(config_file),
                    "--export-path", str(tmp / "store")])
    return tmp / "store" / f"{name}.mar"


def has_internals(body) -> bool:
    """A stack trace or a file path in an answer body (which must carry neither)."""
    if isinstance(body, bytes):
        body = body.decode(errors="replace")
    return "Traceback" in body or re.search(r"\.py\b|site-packages|/(usr|home|tmp|work|opt|root|var)/", body) is not None


def read_exactly(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "socket closed mid-message"
        data += chunk
    return data


def decode_message(sock) -> tuple[int, dict]:
    """One predict response on TorchServe's worker socket, as the 0.12 frontend reads it
    (ModelResponseDecoder): (code, {request id: {content_type, status, phrase, headers, body}})."""

    def integer():
        return struct.unpack("!i", read_exactly(sock, 4))[0]

    def text():
        return read_exactly(sock, integer()).decode()

    code, _message = integer(), text()
    out = {}
    while True:
        length = integer()
        if length == -1:
            return code, out
        request_id = read_exactly(sock, length).decode()
        entry = {"content_type": text(), "status": integer(), "phrase": text()}
        entry["headers"] = dict((text(), text()) for _ in range(integer()))
        entry["body"] = read_exactly(sock, integer())
        out[request_id] = entry
