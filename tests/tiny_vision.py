"""Small random image classifiers of every kind a user packages, for tests (nothing is
downloaded): a user's model file, timm's test models, Hugging Face image classifiers
saved with their image processors, and TorchScript."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

LABELS = ("cat", "dog", "owl")

# A user's model file as TorchServe expects it: one nn.Module class, built without arguments.
CNN_SOURCE = '''\
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))
'''


def write_labels(path: Path, labels=LABELS) -> Path:
    path.write_text(json.dumps({str(i): label for i, label in enumerate(labels)}))
    return path


def tiny_cnn(folder: Path, seed: int = 0) -> tuple[Path, Path, torch.nn.Module]:
    """(model.py, its state dict, the model) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "model.py"
    source.write_text(CNN_SOURCE)
    namespace: dict = {}
    exec(compile(CNN_SOURCE, str(source), "exec"), namespace)
    torch.manual_seed(seed)
    model = namespace["TinyNet"]().eval()
    weights = folder / "tinynet.pt"
    torch.save(model.state_dict(), weights)
    return source, weights, model


def timm_model(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=len(LABELS), **kwargs).eval()


def _hf_vit(t):
    return t.ViTForImageClassification(t.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=3)), t.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def _hf_deit(t):
    config = t.DeiTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, num_labels=3)
    processor = t.DeiTImageProcessor(size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32})
    return t.DeiTForImageClassification(config), processor


def _hf_swin(t):
    config = t.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
                          num_labels=3)
    return t.SwinForImageClassification(config), t.ViTImageProcessor(size={"height": 32, "width": 32})


def _hf_convnext(t):
    config = t.ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    return t.ConvNextForImageClassification(config), t.ConvNextImageProcessor(size={"shortest_edge": 32},
                                                                              crop_pct=0.875)


def _hf_resnet(t):
    config = t.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    return t.ResNetForImageClassification(config), t.ConvNextImageProcessor(size={"shortest_edge": 32},
                                                                            crop_pct=0.875)


HF_IMAGE_FAMILIES = {"vit": _hf_vit, "deit": _hf_deit, "swin": _hf_swin, "convnext": _hf_convnext,
                     "resnet": _hf_resnet}


def hf_image_classifier(family: str, folder: Path, seed: int = 0) -> Path:
    """A tiny random ``family`` image classifier with labels, saved with its processor in ``folder``."""
    import transformers

    torch.manual_seed(seed)
    model, processor = HF_IMAGE_FAMILIES[family](transformers)
    model.config.id2label = dict(enumerate(LABELS))
    model.config.label2id = {label: i for i, label in enumerate(LABELS)}
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def scripted(model: torch.nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(model.eval()), str(path))
    return path


