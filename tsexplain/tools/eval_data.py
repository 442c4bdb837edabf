"""What the evaluation feeds a model: a user's images or texts, or the synthetic sets.

Images are brought into the **model's view** once (:func:`model_view`): the image is
decoded as the handler decodes it (EXIF rotation, RGB) and put through the model's own
*resize* step only. That resized image (the *frame*) is what travels to the model, as a
lossless PNG: the handler's resize then leaves it as it is (resizing an image to its own
size is the identity), and its centre crop takes exactly the :class:`Region` computed
here. So the pixels the evaluation perturbs are the pixels the model sees, at the
resolution it sees them, with no second resampling, in process and through a server
alike; the explanation map covers the region and is upsampled onto it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from ..serving.errors import RequestError
from ..serving.images import Preprocessing, decode_image
from .evaluation import Region
from .synthetic import reviews, shapes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
MAX_IMAGE_PIXELS = 40_000_000  # the handler's default handler.max_image_pixels


class DataError(ValueError):
    """The user's data cannot be used (no images, an empty text file, a crop larger than the image)."""


@dataclass
class ImageView:
    """One image as the model sees it.

    ``frame``: uint8 ``[H, W, 3]``, the image after the model's resize step (what is sent);
    ``region``: the centre crop the model's input is, in frame pixels; ``original``: the
    decoded image (for the geometry check); ``box``: ground-truth object box in region
    pixels (x0, y0, x1, y1), synthetic data only; ``label``: its true class, if known.
    """

    name: str
    frame: np.ndarray
    region: Region
    original: Image.Image
    box: Optional[tuple[float, float, float, float]] = None
    label: Optional[int] = None


def _size_pair(size) -> tuple[int, int]:
    """(height, width) of a torchvision size: an int is square."""
    values = [int(size)] if isinstance(size, int) else [int(s) for s in size]
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def model_view(image: Image.Image, preprocessing: Preprocessing, name: str = "") -> ImageView:
    """``image`` (decoded, RGB) through ``preprocessing``'s resize step, and where its crop lies.

    The region is computed as torchvision's ``center_crop`` computes it. Raises
    :class:`DataError` when the crop is larger than the resized image (the model would
    see padding the evaluation cannot perturb).
    """
    frame = Preprocessing(preprocessing.resize, None).geometry(image)
    width, height = frame.size
    if preprocessing.crop is None:
        return ImageView(name, np.asarray(frame), Region(0, 0, width, height), image)
    crop_h, crop_w = _size_pair(preprocessing.crop)
    if crop_h > height or crop_w > width:
        raise DataError(f"{name or 'image'}: the crop {crop_w}x{crop_h} is larger than the resized image "
                        f"{width}x{height}: the model sees padding there; not supported")
    top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    return ImageView(name, np.asarray(frame), Region(left, top, crop_w, crop_h), image)


def _sample(items: list, n: int, seed: int) -> list:
    """``n`` of ``items`` drawn with ``seed`` (all when there are fewer), in their order."""
    if len(items) <= n:
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def image_files(folder: str | Path) -> list[Path]:
    """The image files under ``folder`` (recursively, by suffix), sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def user_images(folder: str | Path, n: int, seed: int, preprocessing: Preprocessing) -> tuple[list[ImageView], list[str]]:
    """``n`` images drawn from ``folder`` (all if fewer), in the model's view, in file-name
    order; also the files met on the way that could not be decoded, with the reason."""
    files = image_files(folder)
    if not files:
        raise DataError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    chosen, skipped = {}, []
    for index in random.Random(seed).sample(range(len(files)), len(files)):  # a seeded order of every file
        if len(chosen) == n:
            break
        path = files[index]
        try:
            image = decode_image(path.read_bytes(), MAX_IMAGE_PIXELS)
        except RequestError as exc:
            skipped.append(f"{path.relative_to(folder)}: {exc}")
            continue
        chosen[index] = model_view(image, preprocessing, str(path.relative_to(folder)))
    views = [chosen[i] for i in sorted(chosen)]
    if not views:
        raise DataError(f"{folder}: none of the images could be decoded ({'; '.join(skipped[:3])})")
    return views, skipped


def user_texts(path: str | Path, n: int, seed: int) -> list[str]:
    """``n`` texts drawn from ``path`` (UTF-8, one text per line, blank lines skipped)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the texts ({type(exc).__name__}: {exc})") from None
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise DataError(f"{path}: no texts (one per line)")
    return _sample(texts, n, seed)


def synthetic_images(n: int, seed: int, image_size: int, preprocessing: Preprocessing) -> list[ImageView]:
    """``n`` synthetic shapes of ``image_size`` pixels in the model's view, with their boxes
    mapped onto the region (the pointing game's ground truth)."""
    views = []
    for k, sample in enumerate(shapes.generate(n, seed, image_size)):
        image = sample.image.convert("RGB")
        view = model_view(image, preprocessing, f"shape-{k}")
        sx, sy = view.frame.shape[1] / image.width, view.frame.shape[0] / image.height
        x0, y0, x1, y1 = sample.box
        r = view.region
        view.box = (x0 * sx - r.left, y0 * sy - r.top, x1 * sx - r.left, y1 * sy - r.top)
        view.label = sample.label
        views.append(view)
    return views


def synthetic_texts(n: int, seed: int) -> list:
    """``n`` synthetic reviews (their ``sentiment_span`` is the cue word, ``label`` the class)."""
    return reviews.generate(n, seed)


def frames(views: Sequence[ImageView]) -> list[np.ndarray]:
    return [v.frame for v in views]
