"""Explanation quality against ground truth from the synthetic data."""
from __future__ import annotations

from typing import Sequence

import torch

from .images import resize_map


def pointing_hit(heatmap: torch.Tensor, box: Sequence[float], height: int, width: int) -> bool:
    """Pointing game: does the map's peak, upsampled to ``height`` x ``width``, fall in ``box``?

    ``box`` is (x0, y0, x1, y1) in input pixels, x1/y1 exclusive.
    """
    full = resize_map(heatmap, height, width)
    y, x = divmod(int(full.argmax()), width)
    x0, y0, x1, y1 = box
    return x0 <= x < x1 and y0 <= y < y1


def top_k_hit(words: Sequence[dict], span: Sequence[int], k: int) -> bool:
    """Is a word overlapping character ``span`` among the ``k`` words of largest |attribution|?"""
    start, end = span
    ranked = sorted(words, key=lambda w: abs(w["attribution"]), reverse=True)[:k]
    return any(w["start"] < end and start < w["end"] for w in ranked)
