"""Tiny vision transformers of four families (timm ViT, timm Swin, Hugging Face ViT and
Swin), trained briefly on the CPU on the synthetic shapes, so that a test can check
that the automatic layer choice gives maps that point at the object.

Built from configs with random initialisation (nothing downloaded). Each trained
model is cached in ``build/layer_families/<family>/`` with a fingerprint of its
recipe, this file, the shapes generator and the library's version: a machine trains
each once. ``python tests/trained_families.py [family ...]`` trains ahead and prints
the accuracy, the pointing rate and the time taken.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "build" / "layer_families"
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

# Training recipe per family: shapes images, AdamW with a one-cycle schedule, flips;
# one thread (on a shared 2-core machine, more threads mostly spin).
RECIPES = {
    "timm_vit": {"library": "timm", "size": 64, "n_train": 8000, "epochs": 6, "batch_size": 64, "lr": 2e-3,
                 "arch": {"patch_size": 8, "embed_dim": 64, "depth": 3, "num_heads": 4, "mlp_ratio": 2.0}},
    "timm_swin": {"library": "timm", "size": 64, "n_train": 8000, "epochs": 10, "batch_size": 64, "lr": 2e-3,
                  "arch": {"patch_size": 4, "embed_dim": 32, "depths": [1, 1], "num_heads": [2, 4], "window_size": 4}},
    "hf_vit": {"library": "transformers", "size": 64, "n_train": 8000, "epochs": 6, "batch_size": 64, "lr": 2e-3,
               "arch": {"patch_size": 8, "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                        "intermediate_size": 128}},
    "hf_swin": {"library": "transformers", "size": 64, "n_train": 8000, "epochs": 10, "batch_size": 64, "lr": 2e-3,
                "arch": {"patch_size": 4, "embed_dim": 32, "depths": [1, 1], "num_heads": [2, 4], "window_size": 4}},
}
SEED = 0
NUM_CLASSES = 6


def build(family: str, recipe: dict = None) -> nn.Module:
    """The family's model with random weights (seeded), returning ``[N, K]`` logits."""
    recipe = recipe or RECIPES[family]
    torch.manual_seed(recipe.get("seed", SEED))
    arch, size = recipe["arch"], recipe["size"]
    if family == "timm_vit":
        import timm

        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES, img_size=size, **arch)
    if family == "timm_swin":
        import timm

        return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=NUM_CLASSES,
                                 img_size=size, **{**arch, "depths": tuple(arch["depths"]),
                                                   "num_heads": tuple(arch["num_heads"])})
    from tsexplain.serving.models import LogitsOnly

    if family == "hf_vit":
        from transformers import ViTConfig, ViTForImageClassification

        return LogitsOnly(ViTForImageClassification(ViTConfig(image_size=size, num_labels=NUM_CLASSES, **arch)))
    if family == "hf_swin":
        from transformers import SwinConfig, SwinForImageClassification

        return LogitsOnly(SwinForImageClassification(SwinConfig(image_size=size, num_labels=NUM_CLASSES, **arch)))
    raise ValueError(f"unknown family {family!r}; known: {sorted(RECIPES)}")


def shapes_batch(n: int, seed: int, size: int):
    """``(inputs, labels, boxes)``: ``n`` synthetic shapes images, normalised as the demo's."""
    from tsexplain.tools.synthetic import shapes

    samples = shapes.generate(n, seed, size)
    images = torch.from_numpy(np.stack([np.asarray(s.image) for s in samples])).permute(0, 3, 1, 2).float() / 255
    return (images - MEAN) / STD, torch.tensor([s.label for s in samples]), [s.box for s in samples]


def fingerprint(family: str) -> str:
    from importlib.metadata import version

    from tsexplain.tools.synthetic import shapes

    digest = hashlib.sha256(json.dumps({"family": family, **RECIPES[family]}, sort_keys=True).encode())
    digest.update(version(RECIPES[family]["library"]).encode())
    for path in (Path(__file__), Path(shapes.__file__)):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def trained(family: str) -> tuple[nn.Module, dict]:
    """The family's model after its recipe's training (cached), in eval mode, and the
    training record (``seconds``, ``accuracy`` on 300 validation images, ``cached``)."""
    folder = CACHE / family
    weights, record_path = folder / "weights.pt", folder / "training.json"
    key = fingerprint(family)
    model = build(family)
    if weights.exists() and record_path.exists():
        record = json.loads(record_path.read_text())
        if record.get("fingerprint") == key:
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            return model.eval(), {**record, "cached": True}
    record = train(model, family)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights)
    record_path.write_text(json.dumps({**record, "fingerprint": key}, indent=2))
    return model.eval(), {**record, "cached": False}


def train(model: nn.Module, family: str, recipe: dict = None) -> dict:
    recipe = recipe or RECIPES[family]
    seed = recipe.get("seed", SEED)
    start, cpu = time.perf_counter(), time.process_time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    try:
        inputs, labels, _ = shapes_batch(recipe["n_train"], SEED, recipe["size"])
        generator = torch.Generator().manual_seed(seed)
        steps = len(inputs) // recipe["batch_size"]
        optimiser = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=0.05)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=recipe["lr"], total_steps=recipe["epochs"] * steps,
                                                       pct_start=0.2)
        model.train()
        for _epoch in range(recipe["epochs"]):
            order = torch.randperm(len(inputs), generator=generator)
            for step in range(steps):
                rows = order[step * recipe["batch_size"]:(step + 1) * recipe["batch_size"]]
                batch = inputs[rows]
                flip_x, flip_y = torch.rand(2, len(rows), 1, 1, 1, generator=generator) < 0.5
                batch = torch.where(flip_y, batch.flip(2), torch.where(flip_x, batch.flip(3), batch))
                loss = F.cross_entropy(model(batch), labels[rows])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
        model.eval()
        held, held_labels, _ = shapes_batch(300, SEED + 1, recipe["size"])
        with torch.no_grad():
            accuracy = float((model(held).argmax(1) == held_labels).float().mean())
    finally:
        torch.set_num_threads(threads)
    return {"family": family, "seconds": round(time.perf_counter() - start, 1),
            "cpu_seconds": round(time.process_time() - cpu, 1), "accuracy": round(accuracy, 3), "recipe": recipe}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from tsexplain.attr.cam import GradCAM
    from tsexplain.attr.layer_choice import choose_layer, probe_input
    from tsexplain.attr.layers import get_layer
    from tsexplain.tools.evaluation import pointing_hit

    torch.set_num_threads(1)
    for name in sys.argv[1:] or sorted(RECIPES):
        net, info = trained(name)
        size = RECIPES[name]["size"]
        grid = choose_layer(net, probe_input(size, size))
        x, y, boxes = shapes_batch(300, 424243, size)
        out = GradCAM(net, get_layer(net, grid.name), grid).attribute(x)
        hits = sum(pointing_hit(h, b, size, size) for h, b in zip(out.heatmaps, boxes))
        chance = sum((b[2] - b[0]) * (b[3] - b[1]) for b in boxes) / len(boxes) / size / size
        correct = float((out.logits.argmax(1) == y).float().mean())
        print(f"{name}: {grid}; trained in {info['seconds']} s ({info.get('cpu_seconds')} s CPU; cached {info['cached']}); accuracy {correct:.3f}; "
              f"pointing {hits / len(boxes):.3f} (chance {chance:.3f})", flush=True)
