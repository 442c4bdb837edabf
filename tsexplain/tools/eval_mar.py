"""A MAR evaluated in process, loaded and driven as TorchServe 0.12's worker does it.

:class:`MarHandler` unpacks the archive, loads it with TorchServe's own model loader
(``ts.model_loader.TsModelLoader``: the manifest's handler, ``initialize`` with a
TorchServe ``Context`` holding the MAR's model config YAML), and answers requests by
calling the handler's ``handle`` with the rows and headers TorchServe's frontend would
give it for ``/predictions`` and ``/explanations``. So the model, its preprocessing, its
target layer and its explanation settings are the ones it is served with.

Only what decides *who* may get an explanation and *how* answers travel is changed,
by model-specific environment overrides during loading (``TSEXPLAIN_<MODEL>_<KEY>``)
and in the unpacked copy of the YAML: the gate is opened (``policy: all``, no token,
no per-batch cap, every request field allowed), the explanation cache is off (the
sanity check changes the weights under it), and ``asyncCommunication`` is off (it
needs TorchServe's frontend). The weights are in ``.model`` (the handler's, as
TorchServe's ``BaseHandler`` keeps it), for the sanity check.

The handler imports ``tsexplain`` from this installation: a MAR whose packed serving
code differs is reported (:attr:`MarHandler.code_differs`).
"""
from __future__ import annotations

import contextlib
import filecmp
import json
import logging
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml

from ..serving.config import env_names
from .eval_backends import EvaluationError, ImageRequests, Payload, TextRequests

#: The settings opened in process, and their values (see module doc).
OPENED_SETTINGS = {"enabled": "true", "policy": "all", "token_env": "null", "token_file": "null",
                   "max_per_batch": "null", "request_overrides": "null", "cache_mb": "0"}
PACKAGE = Path(__file__).resolve().parents[1]


class NullMetrics:
    """Stands in for TorchServe's metrics cache: every ``add_*`` call is accepted and dropped."""

    def __getattr__(self, name):
        if name.startswith("add_") or name == "set_request_ids":
            return lambda *args, **kwargs: None
        raise AttributeError(name)


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _torchserve_value(body: bytes, content_type: str) -> Any:
    """A request body as TorchServe 0.12's worker hands it to ``handle``
    (``ts/protocol/otf_message_handler.py``: JSON decoded, ``text/*`` as str, else bytes)."""
    if content_type == "application/json":
        return json.loads(body.decode("utf-8"))
    if content_type.startswith("text"):
        return body.decode("utf-8")
    return body


def _differing_files(packed: Path) -> list[str]:
    """Serving files of the MAR's ``tsexplain`` copy that differ from this installation's."""
    out = []
    for sub in ("attr", "serving"):
        for path in sorted((packed / sub).rglob("*.py")) if (packed / sub).is_dir() else []:
            mine = PACKAGE / sub / path.relative_to(packed / sub)
            if not mine.exists() or not filecmp.cmp(path, mine, shallow=False):
                out.append(str(path.relative_to(packed.parent)))
    return out


class MarHandler:
    """The MAR at ``mar_path`` loaded in process; :meth:`_answers` drives its handler."""

    def __init__(self, mar_path: str | os.PathLike, batch_size: int = 16):
        # TorchServe's BaseHandler warns at import about optional runtimes (OpenVINO, ONNX, TensorRT)
        logging.getLogger("ts.torch_handler.base_handler").setLevel(logging.ERROR)
        from ts.model_loader import ModelLoaderFactory

        self.mar = Path(mar_path)
        if not zipfile.is_zipfile(self.mar):
            raise EvaluationError(f"{self.mar}: not a MAR (zip) file")
        self.model_dir = Path(tempfile.mkdtemp(prefix="tsexplain-eval-"))
        with zipfile.ZipFile(self.mar) as archive:
            archive.extractall(self.model_dir)
        try:
            manifest = json.loads((self.model_dir / "MAR-INF" / "MANIFEST.json").read_text())
            model = manifest["model"]
            self.name, handler = model["modelName"], model["handler"]
        except (OSError, ValueError, KeyError) as exc:
            raise EvaluationError(f"{self.mar}: no usable MAR-INF/MANIFEST.json ({type(exc).__name__}: {exc})") from None
        config_file = self.model_dir / model.get("configFile", "")
        if model.get("configFile") and config_file.is_file():
            config = yaml.safe_load(config_file.read_text()) or {}
            config.pop("asyncCommunication", None)
            config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.code_differs = _differing_files(self.model_dir / "tsexplain")
        self.batch_size = batch_size
        self.labels: list = []
        overrides = {env_names(self.name, key)[0]: value for key, value in OPENED_SETTINGS.items()}
        # As the worker: the model folder is the working directory's and on sys.path; handler
        # modules of an earlier MAR with the same names are dropped first.
        for stale in [p.stem for p in self.model_dir.glob("*.py")]:
            sys.modules.pop(stale, None)
        sys.path.insert(0, str(self.model_dir))
        cwd = os.getcwd()
        try:
            os.chdir(self.model_dir)
            with _environment(overrides):
                gpu = 0 if torch.cuda.is_available() else None
                self.service = ModelLoaderFactory.get_model_loader().load(
                    self.name, str(self.model_dir), handler, gpu, batch_size, None, True, NullMetrics())
        except Exception as exc:  # noqa: BLE001 - the worker's load error, reported as the worker would log it
            self.close()
            raise EvaluationError(f"{self.mar}: the handler failed to load: {type(exc).__name__}: {exc}") from None
        finally:
            os.chdir(cwd)
        self.handler = getattr(self.service._entry_point, "__self__", None)  # a handler class's instance
        self.model: Optional[torch.nn.Module] = getattr(self.handler, "model", None)
        self.labels = list(getattr(getattr(self.handler, "runner", None), "labels", None) or [])
        self.description = f"in process: {self.mar} (handler {handler})"

    def close(self) -> None:
        if str(self.model_dir) in sys.path:
            sys.path.remove(str(self.model_dir))
        shutil.rmtree(self.model_dir, ignore_errors=True)

    def _answers(self, route: str, payloads: Sequence[Payload]) -> list[Any]:
        from ts.context import RequestProcessor

        headers = {"url_path": f"{route}/{self.name}"}
        if route == "explanations":
            headers["explain"] = "True"  # as TorchServe 0.12 marks the /explanations route
        out = []
        context = self.service.context
        for start in range(0, len(payloads), self.batch_size):
            chunk = payloads[start:start + self.batch_size]
            context.request_processor = [RequestProcessor({**headers, "Content-Type": ct}) for _, ct in chunk]
            context.request_ids = {i: f"eval-{start + i}" for i in range(len(chunk))}
            rows = [{"body": _torchserve_value(body, ct)} for body, ct in chunk]
            bodies = self.service._entry_point(rows, context)
            for i, body in enumerate(bodies):
                status = context.get_response_status(i)[0]
                text = body.decode("utf-8", "replace") if isinstance(body, (bytes, bytearray)) else str(body)
                if status != 200:
                    raise EvaluationError(f"{route}/{self.name} answered {status}: {text[:300]}")
                out.append(json.loads(text))
        return out

    def run_forward(self, item) -> None:
        self.predict_proba([item])


class MarImage(MarHandler, ImageRequests):
    """An image MAR in process; ``preprocessing`` is its handler's own."""

    def __init__(self, mar_path: str | os.PathLike, batch_size: int = 16):
        super().__init__(mar_path, batch_size)
        runner = getattr(self.handler, "runner", None)
        self.preprocessing = getattr(runner, "preprocessing", None)
        if self.preprocessing is None:
            self.close()
            raise EvaluationError(f"{self.mar}: not an image model of this package (its handler has no preprocessing)")


class MarText(MarHandler, TextRequests):
    """A text MAR in process."""

    def __init__(self, mar_path: str | os.PathLike, batch_size: int = 16):
        try:  # no "Loading weights" progress bar in the tool's output
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
        super().__init__(mar_path, batch_size)
