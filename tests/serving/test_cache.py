"""The explanation cache: the LRU and its key (the handlers' use of it: tests/glue/test_cache_handler.py)."""

import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tsexplain.serving.cache import PREDICTED, ExplanationCache, cache_key, fingerprint_files, model_version

KEY_ARGS = dict(data=b"some text", model_version="1.0+abc", method="layer_ig", target=1,
                params={"n_steps": 50, "outputs": ["heatmap"], "precision": "fp32"})


# --- core -----------------------------------------------------------------------------


def test_key_changes_with_every_part():
    base = cache_key(**KEY_ARGS)
    assert cache_key(**KEY_ARGS) == base and len(base) == 64
    changes = [
        {"data": b"some text."},
        {"model_version": "1.0+abd"},
        {"method": "gradcam"},
        {"target": 2},
        {"params": {**KEY_ARGS["params"], "n_steps": 51}},
        {"params": {**KEY_ARGS["params"], "outputs": ["heatmap", "overlay_png"]}},
        {"params": {**KEY_ARGS["params"], "precision": "bf16"}},
        {"params": {**KEY_ARGS["params"], "extra": None}},
    ]
    keys = {cache_key(**{**KEY_ARGS, **change}) for change in changes}
    assert base not in keys and len(keys) == len(changes)
    # parameter order does not matter
    assert cache_key(**{**KEY_ARGS, "params": dict(reversed(list(KEY_ARGS["params"].items())))}) == base
    # the target is a class index or the symbolic "predicted class", which no index can collide with
    indexed = {cache_key(**{**KEY_ARGS, "target": t}) for t in range(1000)}
    symbolic = cache_key(**{**KEY_ARGS, "target": PREDICTED})
    assert len(indexed) == 1000 and symbolic not in indexed and symbolic == cache_key(**{**KEY_ARGS, "target": "predicted"})
    for bad in (None, "1", "Predicted", True, 1.0, [1]):
        with pytest.raises(TypeError):
            cache_key(**{**KEY_ARGS, "target": bad})


def test_hit_returns_an_identical_fresh_copy():
    cache = ExplanationCache(1 << 20, 100)
    value = {"tokens": [{"token": "caf\u00e9", "attribution": 0.1 + 0.2}], "delta": 1e-300, "flag": None}
    assert cache.get("k") is None and cache.misses == 1
    assert cache.put("k", value)
    first = cache.get("k")
    assert first == value and cache.hits == 1
    first["tokens"].clear()  # the caller may change its copy
    assert cache.get("k") == value


def test_never_holds_tensors_or_graphs():
    cache = ExplanationCache(1 << 20, 100)
    with pytest.raises(TypeError):
        cache.put("k", {"attribution": torch.ones(3, requires_grad=True)})
    assert len(cache) == 0 and cache.bytes == 0
    cache.put("k", {"a": [1.0, 2.0]})
    assert all(isinstance(v, bytes) for v in cache._entries.values())


@settings(max_examples=60, deadline=None)
@given(
    max_bytes=st.integers(0, 20_000),
    max_entries=st.integers(0, 30),
    sizes=st.lists(st.integers(0, 3_000), max_size=80),
    keys=st.lists(st.integers(0, 40), max_size=80),
)
def test_bounds_always_hold(max_bytes, max_entries, sizes, keys):
    cache = ExplanationCache(max_bytes, max_entries)
    for key, size in zip(keys, sizes):
        cache.put(str(key), {"v": "x" * size})
        assert cache.bytes <= max_bytes and len(cache) <= max_entries
        assert cache.bytes == sum(sys.getsizeof(v) + sys.getsizeof(k) for k, v in cache._entries.items())


def test_least_recently_used_goes_first():
    cache = ExplanationCache(1 << 20, 3)
    for key in "abc":
        cache.put(key, {"k": key})
    cache.get("a")  # a is now the most recent
    cache.put("d", {"k": "d"})
    assert cache.get("b") is None and all(cache.get(k) is not None for k in "acd")
    small = ExplanationCache(200, 10)
    assert not small.put("big", {"v": "x" * 500}) and len(small) == 0  # larger than the whole cache


def test_disabled_cache_stores_nothing():
    for cache in (ExplanationCache(0, 10), ExplanationCache(1 << 20, 0)):
        assert not cache.enabled and not cache.put("k", {"a": 1}) and cache.get("k") is None


def test_fingerprint_follows_the_files(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "config.json").write_text("{}")
    first = fingerprint_files(tmp_path)
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "x.pyc").write_bytes(b"cache")
    assert fingerprint_files(tmp_path) == first  # byte-code caches do not count
    (tmp_path / "weights.bin").write_bytes(b"\0" * 999 + b"\1")
    assert fingerprint_files(tmp_path) != first
    assert model_version({"model": {"modelVersion": "2.0"}}, "ab" * 32) == "2.0+" + "ab" * 8
