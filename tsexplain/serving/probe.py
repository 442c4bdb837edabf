"""A MAR that builds, loads: the check ``build_mar.sh`` runs on a MAR's files before it
archives them (and ``build_mar.sh check`` on any MAR).

:func:`check_model` does what a worker does at load time, with the same functions:
the settings read and validated (``load_settings``), the model loaded
(:mod:`.models`), the runner built (layer choice, layouts), then the batch flow run on
a probe input: one prediction, and one explanation per method in ``explain.methods``.
Any answer other than 200 fails the check with the message the worker would give that
request (for a failure inside the model, the exception itself). The environment's
``TSEXPLAIN_*`` overrides are the server's: they are checked when the worker loads.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
import torch
from PIL import Image

from .cache import ExplanationCache
from .concurrency import check_async_batch_size
from .errors import ConfigError
from .flow import ExplainFlow, Row
from .models import is_scripted, load_image_model, load_text_classifier
from .policy import ExplanationGate
from .schema import IMAGE, TEXT
from .settings import ModelSettings, load_settings

PROBE_TEXT = "probe"  # one word: within any explain.occlusion_max_words


@dataclass
class ProbeReport:
    """What the check found: the model's classes and the probe's answers."""

    modality: str
    labels: list[str]
    methods: list[str]
    layer: Optional[str] = None  # the layer explained (images; None: a TorchScript model)
    uses_timm: bool = False  # the model is built from timm modules (the MAR must declare timm)
    answers: dict = field(default_factory=dict)  # method -> the probe's explanation


def check_model(modality: str, model_dir: os.PathLike, manifest_model: Mapping[str, Any], config: Mapping[str, Any],
                model_name: str, mapping: Optional[dict] = None, device: torch.device | str = "cpu",
                environ: Optional[Mapping[str, str]] = None) -> ProbeReport:
    """Load the model in ``model_dir`` (a MAR's files; ``manifest_model``: the manifest's
    ``model`` entry) as the worker does and explain a probe input with every enabled
    method. ``config``: the model config YAML; ``mapping``: index_to_name.json, as
    TorchServe reads it; ``environ``: stand-ins for settings only the server's environment
    gives (default none). Raises ConfigError with the worker's message."""
    device = torch.device(device)
    settings = load_settings(modality, config, model_name, environ or {})
    if config.get("asyncCommunication") is True:
        check_async_batch_size(int(config.get("batchSize", 1)))
    if modality == IMAGE:
        model = load_image_model(model_dir, manifest_model, settings.handler, device)
        from .runners.image import ImageRunner

        runner = _built(ImageRunner, model, model, mapping, settings, device)
        if mapping and len(mapping) != len(runner.labels):
            raise ConfigError(f"the labels name {len(mapping)} classes, the model outputs {len(runner.labels)}")
        payload, layer = _probe_image(settings), runner.layer_name
    elif modality == TEXT:
        model, tokenizer = load_text_classifier(os.path.join(model_dir, settings.handler.model_path), device)
        from .runners.text import TextRunner

        runner = _built(TextRunner, model, tokenizer, model, tokenizer, settings, device)
        payload, layer = PROBE_TEXT[: settings.handler.max_text_chars], None
    else:
        raise ValueError(f"unknown modality {modality!r}")
    answers = probe(runner, settings, payload)
    uses_timm = not is_scripted(model) and any(type(m).__module__.startswith("timm.") for m in model.modules())
    return ProbeReport(modality, list(runner.labels), list(settings.explain.methods), layer, uses_timm, answers)


def _built(runner_class, *args):
    """The runner, or a ConfigError saying how the model failed on its first (probe) input."""
    try:
        return runner_class(*args)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's model: say what it raised
        raise ConfigError(f"the model failed on a probe input: {type(exc).__name__}: {exc}") from None


def probe(runner, settings: ModelSettings, payload: str) -> dict:
    """Run the flow on one prediction and one explanation per enabled method of ``payload``
    (a text, or an image as base64); returns ``{method: explanation}``, or raises ConfigError."""
    recording = _Recording(runner)
    settings = dataclasses.replace(settings, explain=dataclasses.replace(settings.explain, inject_fault=None))
    explain = settings.explain
    gate = ExplanationGate(True, "all", explain.priority_header, explain.priority_values, "reject", None, None)
    flow = ExplainFlow(recording, settings, gate, ExplanationCache(0, 0), model_name="probe")
    methods = list(explain.methods)
    rows = [Row({"body": {"data": payload}}, {}, explain=False)]
    rows += [Row({"body": {"data": payload, "method": m}}, {}, explain=True) for m in methods]
    flow.run(rows)
    out = {}
    for method, row in zip([None] + methods, rows):
        body = json.loads(row.answer.body)
        what = "the prediction" if method is None else f"method {method}"
        if row.answer.status != 200:
            cause = recording.failures.get(method) if row.answer.status >= 500 else None
            detail = f"{type(cause).__name__}: {cause}" if cause is not None else body.get("message")
            raise ConfigError(f"probe: {what} failed ({row.answer.status} {body.get('type')}): {detail}")
        if method is not None:
            if not isinstance(body.get("explanation"), dict):
                raise ConfigError(f"probe: {what} answered no explanation")
            out[method] = body["explanation"]
    return out


class _Recording:
    """The runner, keeping the exceptions its model work raised (the flow answers them as
    a 503 whose message says nothing of the cause; the build says what it was)."""

    def __init__(self, runner):
        self._runner = runner
        self.failures: dict = {}

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def forward(self, items, fused):
        try:
            return self._runner.forward(items, fused)
        except Exception as exc:
            for item in fused:
                self.failures[item.method] = exc
            if not fused:
                self.failures[None] = exc
            raise

    def explain(self, items):
        try:
            return self._runner.explain(items)
        except Exception as exc:
            for item in items:
                self.failures[item.method] = exc
            raise


def _probe_image(settings: ModelSettings) -> str:
    """A noise image at the model's input size, as base64 PNG."""
    width, height = settings.handler.preprocessing().input_size(256, 256)
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
