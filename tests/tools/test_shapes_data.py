"""Unit tests of the synthetic shapes generator (fast, no model involved)."""

import numpy as np
import pytest
from PIL import Image

from tsexplain.tools.synthetic.shapes import SHAPE_CLASSES, ShapeSample, generate, make_sample

# Shapes are light (luma >= 180) on a dark background (luma <= 75) with mild
# noise, so thresholding luma at the midpoint separates shape pixels reliably;
# only clutter (thin lines, small blobs) can add light pixels elsewhere.
LIGHT = 128


def _light(sample: ShapeSample) -> np.ndarray:
    return np.asarray(sample.image.convert("L")) > LIGHT


def test_deterministic_for_a_seed():
    a, b = generate(8, seed=7, size=64), generate(8, seed=7, size=64)
    for x, y in zip(a, b):
        assert x.label == y.label and x.box == y.box
        assert x.image.tobytes() == y.image.tobytes()
    other = generate(8, seed=8, size=64)
    assert [x.image.tobytes() for x in a] != [x.image.tobytes() for x in other]


def test_make_sample_uses_the_given_generator():
    s1 = make_sample(np.random.default_rng(3), 64)
    s2 = make_sample(np.random.default_rng(3), 64)
    assert (s1.label, s1.box) == (s2.label, s2.box)
    assert s1.image.tobytes() == s2.image.tobytes()


@pytest.mark.parametrize("size", [64, 112])
def test_image_size_and_mode(size):
    for s in generate(5, seed=0, size=size):
        assert isinstance(s.image, Image.Image)
        assert s.image.mode == "RGB" and s.image.size == (size, size)
        assert 0 <= s.label < len(SHAPE_CLASSES)


def test_all_classes_appear():
    labels = {s.label for s in generate(200, seed=1, size=64)}
    assert labels == set(range(len(SHAPE_CLASSES)))


@pytest.mark.parametrize("size", [64, 112])
def test_box_is_tight_around_the_shape(size):
    for s in generate(60, seed=2, size=size):
        x0, y0, x1, y1 = s.box
        assert all(isinstance(v, int) for v in s.box)
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        # A decent fraction of the image side.
        assert min(x1 - x0, y1 - y0) >= 0.2 * size
        light = _light(s)
        inside = light[y0:y1, x0:x1]
        # Shapes are connected, so every row and column of a tight box meets the shape.
        assert inside.any(axis=1).all() and inside.any(axis=0).all()
        # The shape fills a good part of its box.
        assert inside.mean() > 0.3
        # Just outside each side of the box there is no shape, only sparse clutter.
        outside = [
            light[y0 - 1, x0:x1] if y0 > 0 else None,
            light[y1, x0:x1] if y1 < size else None,
            light[y0:y1, x0 - 1] if x0 > 0 else None,
            light[y0:y1, x1] if x1 < size else None,
        ]
        for edge in outside:
            if edge is not None:
                assert edge.mean() < 0.5


def test_shape_contrasts_with_background():
    for s in generate(30, seed=3, size=64):
        x0, y0, x1, y1 = s.box
        luma = np.asarray(s.image.convert("L"), dtype=float)
        outside = np.ones_like(luma, dtype=bool)
        outside[y0:y1, x0:x1] = False
        assert np.median(luma[outside]) < 100
        assert luma[y0:y1, x0:x1][_light(s)[y0:y1, x0:x1]].mean() > 160
