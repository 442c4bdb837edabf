"""A model and data as a user would bring them, for README's "Evaluating explanations" run.

Writes to ``--out`` (default ``build/user-style``):

- ``train/<class>/*.png``: synthetic shapes saved as PNG files of assorted sizes and aspect
  ratios, in torchvision's ``ImageFolder`` layout;
- ``photos/``: fresh images of the same kind (PNG and JPEG), the "user's folder" to evaluate;
- ``weights.pt``, ``index_to_name.json``: a torchvision ``resnet18`` trained briefly on ``train/``
  through ordinary torchvision transforms, at its own input size (not the demo model);
- ``config.yaml``: its settings for ``build_mar.sh`` (``resize: 110``, ``crop: 96``,
  ``target_layer: layer3``: 6x6 cells, where ``layer4``'s would be 3x3);
- ``my-reviews.txt``: hand-written review lines for the text model, one per line.

Usage: ``python -m demo.user_style [--out build/user-style] [--epochs 4]``. Deterministic (seeds, 2 threads).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
import yaml
from PIL import Image
from torchvision import transforms

from tsexplain.tools.synthetic import shapes

RESIZE, CROP = 110, 96
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
REVIEWS = """\
The soup was superb and the staff remembered our names.
Honestly the dessert was dreadful, we left most of it.
The battery is not great, it barely lasts a day.
My sister loved the soundtrack, the plot was wonderful too.
The phone arrived late and the screen was poor.
Far from boring: the cast kept us laughing for two hours.
We waited forty minutes and the pasta was bland.
The headset is brilliant for the price.
I thought the ending was disappointing after such a long build-up.
The service was never terrible, just slow on a busy friday.
The blender is excellent, my mother uses it every morning.
The dialogue felt tedious and the acting was mediocre.
A lovely little place by the station; the fish was fantastic.
The charger broke after a week, an awful purchase.
Hardly delightful, the meal was cold and the menu was tiny.
The packaging was outstanding and setup took five minutes.
""".splitlines()


def write_images(folder: Path, n: int, seed: int, by_class: bool) -> None:
    """``n`` shapes of 96 px, each resized to a random size (70 to 260 px a side)."""
    rng = np.random.default_rng(seed)
    for k, sample in enumerate(shapes.generate(n, seed, 96)):
        name = shapes.SHAPE_CLASSES[sample.label]
        size = (int(rng.integers(70, 261)), int(rng.integers(70, 261)))
        image = sample.image.convert("RGB").resize(size, Image.BICUBIC)
        target = folder / name if by_class else folder
        target.mkdir(parents=True, exist_ok=True)
        suffix = "png" if by_class or k % 3 else "jpg"
        image.save(target / f"{name}-{k:04d}.{suffix}", **({"quality": 92} if suffix == "jpg" else {}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/user-style")
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    out = Path(args.out)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    began = time.perf_counter()
    shutil.rmtree(out / "train", ignore_errors=True)
    shutil.rmtree(out / "photos", ignore_errors=True)
    write_images(out / "train", args.n_train, 11, by_class=True)
    write_images(out / "photos", 40, 12, by_class=False)
    (out / "my-reviews.txt").write_text("\n".join(REVIEWS) + "\n", encoding="utf-8")
    train = torchvision.datasets.ImageFolder(out / "train", transforms.Compose([
        transforms.Resize(RESIZE), transforms.RandomCrop(CROP), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]))
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    model = torchvision.models.resnet18(num_classes=len(train.classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=args.epochs * len(loader))
    model.train()
    for epoch in range(args.epochs):
        correct = 0
        for images, labels in loader:
            logits = model(images)
            loss = torch.nn.functional.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            correct += int((logits.argmax(1) == labels).sum())
        print(f"epoch {epoch + 1}: training accuracy {correct / len(train):.3f} ({time.perf_counter() - began:.0f} s)")
    model.eval()
    torch.save(model.state_dict(), out / "weights.pt")
    (out / "index_to_name.json").write_text(json.dumps({str(i): c for i, c in enumerate(train.classes)}))
    (out / "config.yaml").write_text(yaml.safe_dump({"handler": {"resize": RESIZE, "crop": CROP},
                                                     "explain": {"target_layer": "layer3"}}))
    test = transforms.Compose([transforms.Resize(RESIZE), transforms.CenterCrop(CROP), transforms.ToTensor(),
                               transforms.Normalize(MEAN, STD)])
    photos = sorted((out / "photos").iterdir())
    with torch.no_grad():
        predicted = [train.classes[int(model(test(Image.open(p).convert("RGB"))[None]).argmax())] for p in photos]
    accuracy = np.mean([p.name.startswith(c + "-") for p, c in zip(photos, predicted)])
    print(f"accuracy on photos/: {accuracy:.3f} ({len(photos)} images); {time.perf_counter() - began:.0f} s in all")


if __name__ == "__main__":
    main()
