"""Deterministic synthetic "shapes" images for the demo classifier.

Each image holds exactly one filled shape (one of ``SHAPE_CLASSES``) at a random
position, size, rotation and (light) colour, drawn over a cluttered, darker
background: a random colour gradient, thin random lines, small blobs and pixel
noise.  Every sample carries the tight pixel bounding box of its shape, which
the tests and the evaluation use to check where an explanation points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")

# Shape extent (diameter of its bounding circle) as a fraction of the image side.
_MIN_FRAC, _MAX_FRAC = 0.30, 0.60
# Triangles fill little of their bounding circle; enlarge them to a similar area.
_TRIANGLE_SCALE = 1.2
# Luminance bands (0-255): the background gradient is dark and the shape light,
# so the shape always stands out by >= 105 luminance levels whatever the random
# hues.  A single polarity keeps the task learnable within the demo's CPU budget.
_DARK, _LIGHT = (0.0, 75.0), (180.0, 255.0)
_LUMA = np.array([0.299, 0.587, 0.114])
_NOISE_STD = 8.0


@dataclass(frozen=True)
class ShapeSample:
    """One generated image with its class index and the shape's tight box."""

    image: Image.Image  # RGB, size x size
    label: int  # index into SHAPE_CLASSES
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive


def _regular_polygon(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    """Vertices evenly spaced in angle, with radii cycling through ``radii``."""
    n = len(radii)
    return [
        (cx + r * math.cos(angle + 2 * math.pi * i / n), cy + r * math.sin(angle + 2 * math.pi * i / n))
        for i, r in enumerate(radii)
    ]


def _cross(cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a plus sign with arm half-width ``0.3 r``, rotated by ``angle``."""
    t = 0.3 * r
    pts = [(t, r), (t, t), (r, t), (r, -t), (t, -t), (t, -r),
           (-t, -r), (-t, -t), (-r, -t), (-r, t), (-t, t), (-t, r)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _shape_mask(label: int, size: int, cx: float, cy: float, r: float, angle: float) -> Image.Image:
    """Binary ('L') mask of shape ``label`` with bounding-circle radius ``r``."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    name = SHAPE_CLASSES[label]
    ellipse = (cx - r, cy - r, cx + r, cy + r)
    if name == "circle":
        draw.ellipse(ellipse, fill=255)
    elif name == "ring":
        draw.ellipse(ellipse, fill=255)
        ri = 0.55 * r
        draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)
    elif name == "square":
        draw.polygon(_regular_polygon(cx, cy, [r] * 4, angle), fill=255)
    elif name == "triangle":
        draw.polygon(_regular_polygon(cx, cy, [r] * 3, angle), fill=255)
    elif name == "star":
        draw.polygon(_regular_polygon(cx, cy, [r, 0.42 * r] * 5, angle), fill=255)
    elif name == "cross":
        draw.polygon(_cross(cx, cy, r, angle), fill=255)
    else:  # pragma: no cover - guarded by SHAPE_CLASSES
        raise ValueError(name)
    return mask


def _colour(rng: np.random.Generator, band: tuple[float, float]) -> np.ndarray:
    """A random RGB colour whose luminance lies in ``band``."""
    while True:
        col = rng.uniform(0, 255, size=3)
        if band[0] <= _LUMA @ col <= band[1]:
            return col


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Random dark linear two-colour gradient with thin lines and small blobs."""
    c0, c1 = _colour(rng, _DARK), _colour(rng, _DARK)
    theta = rng.uniform(0, 2 * math.pi)
    coords = np.arange(size) / max(size - 1, 1)
    t = math.cos(theta) * coords[None, :] + math.sin(theta) * coords[:, None]
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    grad = c0 + t[..., None] * (c1 - c0)
    img = Image.fromarray(grad.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    # Clutter: 1-px lines and blobs of at most 6% of the side, both much
    # thinner / smaller than any shape so they cannot pass for one.
    for _ in range(rng.integers(2, 6)):
        x0, y0, x1, y1 = rng.uniform(0, size, size=4)
        draw.line((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=1)
    blob_r = max(1.5, 0.03 * size)
    for _ in range(rng.integers(2, 7)):
        x, y = rng.uniform(0, size, size=2)
        rx, ry = rng.uniform(0.6, 1.0, size=2) * blob_r
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img


def make_sample(rng: np.random.Generator, size: int) -> ShapeSample:
    """Draw one random sample of ``size`` x ``size`` pixels using ``rng``."""
    img = _background(rng, size)
    label = int(rng.integers(len(SHAPE_CLASSES)))
    r = rng.uniform(_MIN_FRAC, _MAX_FRAC) * size / 2
    if SHAPE_CLASSES[label] == "triangle":
        r *= _TRIANGLE_SCALE
    cx, cy = rng.uniform(r, size - r, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    mask = _shape_mask(label, size, cx, cy, r, angle)
    img.paste(tuple(int(v) for v in _colour(rng, _LIGHT)), mask=mask)
    noise = rng.normal(0.0, _NOISE_STD, size=(size, size, 3))
    img = Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8), "RGB")
    return ShapeSample(image=img, label=label, box=mask.getbbox())


def generate(n: int, seed: int, size: int) -> list[ShapeSample]:
    """Generate ``n`` samples; the same ``seed`` always gives the same samples."""
    rng = np.random.default_rng(seed)
    return [make_sample(rng, size) for _ in range(n)]
