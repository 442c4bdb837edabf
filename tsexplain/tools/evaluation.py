"""Explanation quality: faithfulness curves and agreement with synthetic ground truth.

Pure functions on numpy arrays that take a ``predict_proba`` callable, so the
same code scores a model in process or through a server (see
:mod:`tsexplain.tools.evaluate` for the backends and the command line).

Images (RISE-style, Petsiuk et al. 2018):

- **Deletion**: pixels are replaced, most salient first, by the *deletion
  substrate* in ``steps`` equal steps, and the target probability is recorded
  after each step. The substrate is a constant image of the image's own mean
  colour (per channel): it removes shapes and edges without adding new ones, and
  it is the analogue of RISE's zero in normalised space (the data mean), but
  needs no knowledge of the model's normalisation. A faithful map makes the
  probability fall early: a **low** area under the curve.
- **Insertion**: starts from a Gaussian blur of the image (the *insertion
  start*, as in RISE) and puts the original pixels back, most salient first: a
  **high** area under the curve.
- The map is upsampled bilinearly to the image's resolution
  (:func:`upsample_map`); ties (Grad-CAM's zeros) are broken in a
  random order drawn from the seed, never in raster order.
- **Regions**: when the model sees only part of an image (a centre crop of the
  resized image, :class:`Region`), the map covers that region, only its pixels
  are perturbed, the fractions count its pixels, and the deletion substrate is
  its mean colour; the rest of the image is left as it is (the model never sees
  it).
- The AUC is the trapezoid rule over the fraction of pixels perturbed, in [0, 1].
- **Random baseline**: maps of i.i.d. uniform values *at the explanation map's
  own resolution*, upsampled the same way, so the baseline differs from the
  method only in where it points, not in how coarse it is.

Text:

- **Cue hit@k**: is the deciding word among the ``k`` words of largest
  |attribution| (:func:`top_k_hit`).
- **Word deletion**: the words with the largest *signed* attribution towards
  the target are deleted from the text (their characters removed, whitespace
  collapsed), one more at each step, and the re-tokenized text's target
  probability is recorded. Signed, because a word that speaks against the target
  (negative attribution) should raise its probability when removed, not lower
  it. The random baseline deletes words in random orders.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter


#: ``predict_proba(batch) -> [B, K]`` class probabilities. For images the batch is a
#: list of uint8 ``[H, W, 3]`` arrays (sizes may differ), for text a list of strings.
PredictProba = Callable[[object], np.ndarray]


@dataclass(frozen=True)
class Region:
    """The part of an image the model sees: rows ``top:top + height``, columns
    ``left:left + width`` (a centre crop of the resized image)."""

    left: int
    top: int
    width: int
    height: int

    @classmethod
    def whole(cls, image: np.ndarray) -> "Region":
        return cls(0, 0, image.shape[1], image.shape[0])

    def flat_indices(self, image_width: int) -> np.ndarray:
        """Flat (row-major) indices, in the whole image, of the region's pixels in raster order."""
        rows = np.arange(self.top, self.top + self.height)[:, None]
        cols = np.arange(self.left, self.left + self.width)[None, :]
        return (rows * image_width + cols).ravel()

    def pixels(self, image: np.ndarray) -> np.ndarray:
        return image[self.top:self.top + self.height, self.left:self.left + self.width]


def pointing_hit(heatmap: torch.Tensor, box: Sequence[float], height: int, width: int) -> bool:
    """Pointing game: does the map's peak, upsampled to ``height`` x ``width``, fall in ``box``?

    ``box`` is (x0, y0, x1, y1) in input pixels, x1/y1 exclusive. Works for signed maps
    too (the peak is the largest value).
    """
    full = upsample_map(heatmap, height, width)
    y, x = divmod(int(full.argmax()), width)
    x0, y0, x1, y1 = box
    return x0 <= x < x1 and y0 <= y < y1


def top_k_hit(words: Sequence[dict], span: Sequence[int], k: int) -> bool:
    """Is a word overlapping character ``span`` among the ``k`` words of largest |attribution|?"""
    start, end = span
    ranked = sorted(words, key=lambda w: abs(w["attribution"]), reverse=True)[:k]
    return any(w["start"] < end and start < w["end"] for w in ranked)


# ---------------------------------------------------------------------------- images


def upsample_map(heatmap: np.ndarray | torch.Tensor, height: int, width: int) -> np.ndarray:
    """A ``[h, w]`` map bilinearly resized to ``height`` x ``width`` (values not clipped,
    so signed maps keep their order)."""
    tensor = torch.as_tensor(np.asarray(heatmap, dtype=np.float32))
    if tuple(tensor.shape) == (height, width):
        return tensor.numpy()
    resized = torch.nn.functional.interpolate(tensor[None, None], size=(height, width), mode="bilinear",
                                              align_corners=False)
    return resized[0, 0].numpy()


def pixel_order(saliency: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat pixel indices of a ``[H, W]`` saliency map, most salient first; ties in random order."""
    flat = np.asarray(saliency, dtype=np.float64).ravel()
    shuffled = rng.permutation(flat.size)
    return shuffled[np.argsort(-flat[shuffled], kind="stable")]


def step_counts(n_pixels: int, steps: int) -> np.ndarray:
    """How many pixels are perturbed at each of the ``steps + 1`` points of a curve (0 ... all)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return np.round(np.linspace(0, n_pixels, steps + 1)).astype(int)


def deletion_substrate(image: np.ndarray, region: Optional[Region] = None) -> np.ndarray:
    """What deleted pixels become: the mean colour of ``region`` (default: the whole
    image) everywhere (uint8 ``[H, W, 3]``)."""
    seen = image if region is None else region.pixels(image)
    mean = seen.reshape(-1, image.shape[-1]).mean(axis=0)
    return np.broadcast_to(np.round(mean).astype(np.uint8), image.shape).copy()


def default_blur_radius(height: int, width: int) -> float:
    """Gaussian blur radius (standard deviation, pixels) of the insertion start: 1/8 of the
    shorter side (8 px at 64x64; RISE blurs 224x224 ImageNet images with sigma 5 in an 11 px
    kernel, which on our 64 px shapes would leave them recognisable)."""
    return min(height, width) / 8.0


def insertion_start(image: np.ndarray, radius: Optional[float] = None) -> np.ndarray:
    """The insertion curve's first image: a Gaussian blur of ``image`` (uint8 ``[H, W, 3]``)."""
    radius = default_blur_radius(*image.shape[:2]) if radius is None else radius
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def perturbation_path(start: np.ndarray, end: np.ndarray, order: np.ndarray, steps: int) -> np.ndarray:
    """``[steps + 1, H, W, C]`` images going from ``start`` to ``end``: at point ``i`` the first
    ``step_counts(len(order), steps)[i]`` pixels of ``order`` (flat indices; all ``H*W`` of them,
    or a region's) hold ``end``'s values, the others ``start``'s."""
    height, width, channels = start.shape
    counts = step_counts(order.size, steps)
    rank = np.full(height * width, order.size, dtype=np.int64)  # pixels outside ``order``: never replaced
    rank[order] = np.arange(order.size)
    replaced = rank[None, :] < counts[:, None]  # [steps + 1, H*W]
    flat_start, flat_end = start.reshape(-1, channels), end.reshape(-1, channels)
    path = np.where(replaced[:, :, None], flat_end[None], flat_start[None])
    return path.reshape(steps + 1, height, width, channels)


def auc(curve: np.ndarray) -> np.ndarray:
    """Area under curve(s) sampled at evenly spaced points of [0, 1] (trapezoid rule, last axis)."""
    curve = np.asarray(curve, dtype=np.float64)
    steps = curve.shape[-1] - 1
    return (curve[..., :-1] + curve[..., 1:]).sum(axis=-1) / (2.0 * steps)


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def target_probabilities(paths: Iterable[tuple[np.ndarray, int]], predict_proba: PredictProba,
                         batch_size: int = 64) -> list[np.ndarray]:
    """The target's probability along each ``(path, target)``; paths are ``[P, H, W, 3]`` arrays.

    Images of consecutive paths (of any sizes) share ``predict_proba`` calls of ``batch_size``.
    """
    def rows():
        for index, (path, target) in enumerate(paths):
            for point, image in enumerate(path):
                yield index, point, image, target

    out: dict[int, list[float]] = {}
    for chunk in _batched(rows(), batch_size):
        probs = np.asarray(predict_proba([row[2] for row in chunk]), dtype=np.float64)
        for (index, point, _, target), p in zip(chunk, probs):
            out.setdefault(index, []).append(float(p[target]))
    return [np.array(out[i]) for i in range(len(out))]


@dataclass
class ImageCurves:
    """Deletion and insertion curves, ``[N, steps + 1]`` each (row = image)."""

    deletion: np.ndarray
    insertion: np.ndarray

    @property
    def deletion_auc(self) -> np.ndarray:
        return auc(self.deletion)

    @property
    def insertion_auc(self) -> np.ndarray:
        return auc(self.insertion)


def image_curves(images: Sequence[np.ndarray], saliencies: Sequence[np.ndarray], targets: Sequence[int],
                 predict_proba: PredictProba, steps: int = 16, seed: int = 0, batch_size: int = 64,
                 blur_radius: Optional[float] = None, regions: Optional[Sequence[Region]] = None) -> ImageCurves:
    """Deletion and insertion curves of the target probability for each image.

    Args:
        images: uint8 ``[H, W, 3]`` arrays, as ``predict_proba`` takes them.
        saliencies: one map per image, over its region, any resolution (upsampled
            bilinearly to the region); higher = more important.
        targets: the class whose probability is tracked, per image.
        predict_proba: list of uint8 ``[H, W, 3]`` -> ``[B, K]`` probabilities.
        steps: perturbation steps; each curve has ``steps + 1`` points.
        seed: tie-breaking order.
        blur_radius: of the insertion start (default :func:`default_blur_radius` of the region).
        regions: the part of each image the model sees (default: all of it); only its
            pixels are perturbed.
    """
    regions = [Region.whole(img) for img in images] if regions is None else list(regions)
    if not len(images) == len(saliencies) == len(targets) == len(regions):
        raise ValueError("need one saliency map, one target and one region per image")
    rng = np.random.default_rng(seed)
    orders = []
    for image, saliency, region in zip(images, saliencies, regions):
        within = pixel_order(upsample_map(saliency, region.height, region.width), rng)
        orders.append(region.flat_indices(image.shape[1])[within])
    radii = [default_blur_radius(r.height, r.width) if blur_radius is None else blur_radius for r in regions]
    deletion = target_probabilities(
        ((perturbation_path(img, deletion_substrate(img, region), order, steps), t)
         for img, order, t, region in zip(images, orders, targets, regions)), predict_proba, batch_size)
    insertion = target_probabilities(
        ((perturbation_path(insertion_start(img, radius), img, order, steps), t)
         for img, order, t, radius in zip(images, orders, targets, radii)), predict_proba, batch_size)
    return ImageCurves(np.stack(deletion), np.stack(insertion))


def random_maps(shapes: Sequence[tuple[int, int]], repeats: int, seed: int) -> list[list[np.ndarray]]:
    """``repeats`` maps of i.i.d. uniform values per shape, from ``seed``."""
    rng = np.random.default_rng(seed)
    return [[rng.random(shape) for shape in shapes] for _ in range(repeats)]


def random_image_curves(images: Sequence[np.ndarray], map_shapes: Sequence[tuple[int, int]],
                        targets: Sequence[int], predict_proba: PredictProba, steps: int = 16,
                        repeats: int = 3, seed: int = 0, batch_size: int = 64,
                        blur_radius: Optional[float] = None,
                        regions: Optional[Sequence[Region]] = None) -> ImageCurves:
    """The random-map baseline: curves of ``repeats`` random maps per image, averaged per image."""
    runs = [image_curves(images, maps, targets, predict_proba, steps, seed + 1 + r, batch_size, blur_radius,
                         regions)
            for r, maps in enumerate(random_maps(map_shapes, repeats, seed))]
    return ImageCurves(np.mean([r.deletion for r in runs], axis=0), np.mean([r.insertion for r in runs], axis=0))


# ------------------------------------------------------------------------------ text


def remove_spans(text: str, spans: Iterable[Sequence[int]]) -> str:
    """``text`` without the characters of ``spans``; runs of whitespace collapse to one space."""
    keep = np.ones(len(text), dtype=bool)
    for start, end in spans:
        keep[start:end] = False
    kept = "".join(c for c, k in zip(text, keep) if k)
    return re.sub(r"\s+", " ", kept).strip()


def word_ranking(words: Sequence[dict], by: str = "signed") -> list[dict]:
    """Words most important first: by signed attribution (``"signed"``) or |attribution| (``"abs"``)."""
    if by == "signed":
        return sorted(words, key=lambda w: -w["attribution"])
    if by == "abs":
        return sorted(words, key=lambda w: -abs(w["attribution"]))
    raise ValueError(f"by must be 'signed' or 'abs', got {by!r}")


def deletion_texts(text: str, ranked_words: Sequence[dict], max_words: int) -> list[str]:
    """``text`` with its first 0, 1, ..., ``max_words`` ranked words deleted (``max_words + 1``
    texts). At least one word is always kept; past that point the last text repeats."""
    usable = max(0, min(max_words, len(ranked_words) - 1))
    texts = [remove_spans(text, [(w["start"], w["end"]) for w in ranked_words[:k]]) for k in range(usable + 1)]
    return texts + [texts[-1]] * (max_words - usable)


def text_target_probabilities(variants: Sequence[Sequence[str]], targets: Sequence[int],
                              predict_proba: PredictProba, batch_size: int = 64) -> np.ndarray:
    """``[N, P]`` target probabilities of ``P`` text variants per sample."""
    rows = [(i, t, text) for i, (texts, t) in enumerate(zip(variants, targets)) for text in texts]
    values = []
    for chunk in _batched(rows, batch_size):
        probs = np.asarray(predict_proba([text for _, _, text in chunk]), dtype=np.float64)
        values += [float(p[t]) for (_, t, _), p in zip(chunk, probs)]
    return np.array(values).reshape(len(variants), -1)


def word_deletion_curves(texts: Sequence[str], words: Sequence[Sequence[dict]], targets: Sequence[int],
                         predict_proba: PredictProba, max_words: int = 5, by: str = "signed",
                         batch_size: int = 64) -> np.ndarray:
    """``[N, max_words + 1]`` target probabilities as the top-ranked words are deleted.

    ``words[i]`` are dicts with ``start``, ``end`` (character offsets into ``texts[i]``) and
    ``attribution`` (towards ``targets[i]``); see :func:`word_ranking` for ``by``.
    """
    variants = [deletion_texts(text, word_ranking(ws, by), max_words) for text, ws in zip(texts, words)]
    return text_target_probabilities(variants, targets, predict_proba, batch_size)


def random_word_deletion_curves(texts: Sequence[str], words: Sequence[Sequence[dict]], targets: Sequence[int],
                                predict_proba: PredictProba, max_words: int = 5, repeats: int = 3,
                                seed: int = 0, batch_size: int = 64) -> np.ndarray:
    """The random baseline: words deleted in ``repeats`` random orders per text, averaged per text."""
    rng = np.random.default_rng(seed)
    runs = []
    for _ in range(repeats):
        variants = [deletion_texts(text, [ws[j] for j in rng.permutation(len(ws))], max_words)
                    for text, ws in zip(texts, words)]
        runs.append(text_target_probabilities(variants, targets, predict_proba, batch_size))
    return np.mean(runs, axis=0)


def summarize(values: Sequence[float]) -> dict:
    """Mean, standard deviation and standard error of the mean."""
    values = np.asarray(values, dtype=np.float64)
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return {"mean": float(values.mean()), "std": std, "sem": float(std / max(1.0, np.sqrt(values.size)))}
