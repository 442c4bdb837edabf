"""Train the demo image model: an unmodified torchvision ResNet-18 on synthetic shapes.

Offline and deterministic (fixed seeds, deterministic algorithms, 2 CPU threads):
two runs with the same configuration produce identical weights.  Writes to ``--out``:

- ``weights.pt``          the model's ``state_dict()``
- ``index_to_name.json``  TorchServe's class-index mapping
- ``training.json``       configuration, timings, held-out accuracy and Grad-CAM pointing rate

Usage (from the repository root)::

    python -m demo.train_shapes --out build/demo/shapes [--force]

If ``--out`` already holds results for the same configuration fingerprint (the
hyper-parameters plus the source text of this script and of the generator),
training is skipped and "cached" is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

from tsexplain.tools.synthetic import shapes
from tsexplain.tools.synthetic.shapes import SHAPE_CLASSES, ShapeSample

CONFIG = {
    "architecture": "resnet18",
    "num_classes": len(SHAPE_CLASSES),
    "image_size": 64,
    "target_layer": "layer2",  # 8x8 Grad-CAM cells at 64x64 input
    "seed": 0,  # torch seed and training-data seed
    "heldout_seed": 1_000_003,
    "n_train": 8000,
    "n_heldout": 1000,
    "epochs": 2,
    "batch_size": 32,
    "max_lr": 2e-3,
    "warmup_fraction": 0.25,
    "weight_decay": 5e-4,
}
# Serving normalisation (ImageNet statistics), applied after scaling to [0, 1].
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def fingerprint(config: dict) -> str:
    """Hash of the hyper-parameters and the source text this model depends on."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for path in (Path(__file__), Path(shapes.__file__)):
        h.update(path.read_bytes())
    return h.hexdigest()


def to_uint8(samples: list[ShapeSample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack sample images into an (N, 3, H, W) uint8 tensor plus labels."""
    images = np.stack([np.asarray(s.image) for s in samples])
    labels = torch.tensor([s.label for s in samples])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float, equivalent to ToTensor() followed by Normalize()."""
    return (images.float() / 255 - MEAN) / STD


def train(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, cfg: dict, t0: float) -> None:
    """AdamW with a one-cycle schedule; random flips as (label-preserving) augmentation."""
    gen = torch.Generator().manual_seed(cfg["seed"])
    steps_per_epoch = len(images) // cfg["batch_size"]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["max_lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg["max_lr"], epochs=cfg["epochs"], steps_per_epoch=steps_per_epoch,
        pct_start=cfg["warmup_fraction"],
    )
    model.train()
    for epoch in range(cfg["epochs"]):
        order = torch.randperm(len(images), generator=gen)
        total = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * cfg["batch_size"] : (step + 1) * cfg["batch_size"]]
            x = images[idx]
            flip_h, flip_v = torch.rand(2, len(idx), 1, 1, 1, generator=gen) < 0.5
            x = torch.where(flip_h, x.flip(3), x)
            x = torch.where(flip_v, x.flip(2), x)
            loss = F.cross_entropy(model(normalize(x)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
            if (step + 1) % 25 == 0:
                print(f"epoch {epoch + 1} step {step + 1}/{steps_per_epoch} "
                      f"loss {loss.item():.4f} elapsed {time.perf_counter() - t0:.0f}s", flush=True)
        print(f"epoch {epoch + 1} done: mean loss {total / steps_per_epoch:.4f} "
              f"elapsed {time.perf_counter() - t0:.0f}s", flush=True)


def evaluate(model: torch.nn.Module, samples: list[ShapeSample], target_layer: str) -> tuple[float, float]:
    """Held-out accuracy and Grad-CAM pointing rate.

    Pointing: the peak of the predicted class's Grad-CAM map (bilinearly
    upsampled to the input size) lies inside the shape's box.
    """
    images, labels = to_uint8(samples)
    boxes = torch.tensor([s.box for s in samples])
    acts: list[torch.Tensor] = []
    hook = model.get_submodule(target_layer).register_forward_hook(lambda m, i, o: acts.append(o))
    model.eval()
    correct = hits = 0
    for start in range(0, len(images), 100):
        acts.clear()
        logits = model(normalize(images[start : start + 100]))
        pred = logits.argmax(1)
        # Samples are independent in eval mode, so one backward gives every sample's gradient.
        (grads,) = torch.autograd.grad(logits.gather(1, pred[:, None]).sum(), acts[0])
        cam = F.relu((grads.mean((2, 3), keepdim=True) * acts[0]).sum(1, keepdim=True))
        cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False).flatten(1)
        peak = cam.argmax(1)
        y, x = peak // images.shape[-1], peak % images.shape[-1]
        b = boxes[start : start + 100]
        hits += int(((x >= b[:, 0]) & (x < b[:, 2]) & (y >= b[:, 1]) & (y < b[:, 3])).sum())
        correct += int((pred == labels[start : start + 100]).sum())
    hook.remove()
    return correct / len(samples), hits / len(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/demo/shapes"))
    parser.add_argument("--force", action="store_true", help="retrain even if cached outputs match")
    parser.add_argument("--epochs", type=int, default=CONFIG["epochs"])
    parser.add_argument("--n-train", type=int, default=CONFIG["n_train"])
    args = parser.parse_args()
    t0 = time.perf_counter()
    cfg = {**CONFIG, "epochs": args.epochs, "n_train": args.n_train}
    fp = fingerprint(cfg)

    meta_path = args.out / "training.json"
    if not args.force and (args.out / "weights.pt").exists() and (args.out / "index_to_name.json").exists():
        if meta_path.exists() and json.loads(meta_path.read_text()).get("fingerprint") == fp:
            print(f"cached: {args.out}")
            return

    torch.manual_seed(cfg["seed"])
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)

    images, labels = to_uint8(shapes.generate(cfg["n_train"], cfg["seed"], cfg["image_size"]))
    print(f"generated {len(images)} training images in {time.perf_counter() - t0:.0f}s", flush=True)
    model = torchvision.models.resnet18(weights=None, num_classes=cfg["num_classes"])
    train(model, images, labels, cfg, t0)

    heldout = shapes.generate(cfg["n_heldout"], cfg["heldout_seed"], cfg["image_size"])
    accuracy, pointing = evaluate(model, heldout, cfg["target_layer"])
    seconds = time.perf_counter() - t0
    print(f"held-out accuracy {accuracy:.4f}, Grad-CAM pointing {pointing:.4f}, total {seconds:.0f}s")

    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "weights.pt")
    (args.out / "index_to_name.json").write_text(
        json.dumps({str(i): name for i, name in enumerate(SHAPE_CLASSES)}, indent=2) + "\n"
    )
    meta = {
        **cfg,
        "classes": list(SHAPE_CLASSES),
        "train_seconds": round(seconds, 1),
        "heldout_accuracy": accuracy,
        "pointing_rate": pointing,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "fingerprint": fp,
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks a complete run


if __name__ == "__main__":
    main()
