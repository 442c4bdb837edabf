"""Loading users' models from the MAR's files (no downloads): torchvision classifiers
from an architecture name and a state dict, Hugging Face text classifiers from a
``save_pretrained`` folder."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import torchvision
from torch import nn

from .errors import ConfigError


def build_torchvision_classifier(
    architecture: str, num_classes: int = 1000, weights_path: Optional[str] = None, map_location="cpu"
) -> nn.Module:
    """``torchvision.models.get_model(architecture)`` with the state dict at ``weights_path``.

    Accepts a plain state dict, one wrapped as ``{"state_dict": ...}`` or
    ``{"model": ...}``, and keys prefixed ``module.`` (DataParallel checkpoints).
    """
    try:
        model = torchvision.models.get_model(architecture, weights=None, num_classes=num_classes)
    except ValueError:
        known = ", ".join(sorted(torchvision.models.list_models(module=torchvision.models)))
        raise ConfigError(f"unknown torchvision architecture {architecture!r}; known: {known}") from None
    if weights_path:
        state = torch.load(weights_path, map_location=map_location, weights_only=True)
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict):
            raise ConfigError(f"{weights_path}: expected a state dict, got {type(state).__name__}")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0:3]
            raise ConfigError(
                f"weights do not fit {architecture}(num_classes={num_classes}): {' '.join(first)}"
            ) from None
    return model.eval()


def load_text_classifier(model_path: Path, device: torch.device):
    """``(model, tokenizer)`` of the Hugging Face sequence classifier saved in ``model_path``
    (``save_pretrained``), on ``device`` and in eval mode; never from a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not (Path(model_path) / "config.json").exists():
        raise ConfigError(f"no Hugging Face model at {str(model_path)!r} (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, local_files_only=True)
    return model.to(device).eval(), tokenizer


class LogitsOnly(nn.Module):
    """A classifier whose output is an object with ``.logits`` (a Hugging Face
    ``...ForImageClassification``) seen as one that returns the ``[N, K]`` logits tensor,
    as the runners and the attribution methods expect. The wrapped model is ``.model``,
    so its layers are named ``model.<name>`` (``model.vit.encoder.layer.11.layernorm_before``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values)
        return out.logits if hasattr(out, "logits") else out[0]
