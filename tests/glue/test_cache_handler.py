"""The explanation cache through both handlers in process: hits, misses, stale hits, passes."""

import base64
import json
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from harness import EXPLAIN, InProcessHandler, build_image_mar, build_text_mar, png, unpack
from tsexplain.serving.cache import fingerprint_files, model_version


# --- text handler ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_handler(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text_cache")
    mar = build_text_mar(tmp, "tiny", "bert", config={"explain": {"n_steps": 16, "cache_mb": 1}})
    return InProcessHandler(unpack(mar, tmp / "unpacked"), "text_explainer", "TextExplainer")


def metric_count(handler, name):
    return sum(1 for call in handler.metrics.calls if call[1] and call[1][0] == name)


def without_volatile(explanation):
    return {k: v for k, v in explanation.items() if k not in ("cached", "elapsed_ms")}


def test_text_repeat_is_a_hit_with_the_same_explanation(text_handler):
    body = {"data": "the plot was great", "target": "positive"}
    [(s1, first)] = text_handler([(body, EXPLAIN)])
    [(s2, second)] = text_handler([(body, EXPLAIN)])
    assert s1 == s2 == 200
    assert first["explanation"]["cached"] is False and second["explanation"]["cached"] is True
    assert without_volatile(first["explanation"]) == without_volatile(second["explanation"])
    assert first["predictions"] == second["predictions"]
    assert metric_count(text_handler, "ExplanationCacheHits") >= 1


def test_text_changed_request_misses(text_handler):
    base = {"data": "a dull and long film", "target": "negative"}
    text_handler([(base, EXPLAIN)])
    changes = [{"target": "positive"}, {"n_steps": 8}, {"top_k": 2}, {"html": True}, {"data": "a dull and long film!"},
               {"contrast": "neutral"}, {"method": "grad_x_input"}]
    for change in changes:
        [(status, body)] = text_handler([({**base, **change}, EXPLAIN)])
        assert status == 200 and body["explanation"]["cached"] is False, change
    # no target is keyed as "the predicted class", apart from naming a class (named: its index)
    [(_, predicted)] = text_handler([({"data": "a dull and long film"}, EXPLAIN)])
    label = predicted["predictions"][0]["label"]
    assert predicted["explanation"]["cached"] is False and predicted["explanation"]["target"]["label"] == label
    [(_, named)] = text_handler([({"data": "a dull and long film", "target": label}, EXPLAIN)])
    assert named["explanation"]["cached"] is (label == "negative")  # only the base request named a class before
    [(_, again)] = text_handler([({"data": "a dull and long film"}, EXPLAIN)])
    assert again["explanation"]["cached"] is True and again["explanation"]["target"]["label"] == label


def new_keys(handler, requests):
    """The answers to ``requests`` and the cache keys they stored."""
    before = set(handler.handler.flow.cache._entries)
    out = handler(requests)
    return out, [key for key in handler.handler.flow.cache._entries if key not in before]


def plant_other_class(handler, body):
    """Store under ``body()``'s key (no target) the explanation of another class, as if
    it had been cached while a near-tie went the other way. Returns the first answer."""
    [(_, first)], [symbolic] = new_keys(handler, [(body(), EXPLAIN)])
    other = (first["predictions"][0]["index"] + 1) % 3
    [(_, named)], [explicit] = new_keys(handler, [(body(target=other), EXPLAIN)])
    assert named["explanation"]["target"]["index"] == other
    handler.handler.flow.cache.put(symbolic, json.loads(handler.handler.flow.cache._entries[explicit]))
    return first


def test_text_stale_predicted_hit_is_explained_again(text_handler):
    def body(**fields):
        return {"data": "an odd little tale", **fields}

    first = plant_other_class(text_handler, body)
    cache, misses = text_handler.handler.flow.cache, metric_count(text_handler, "ExplanationCacheMisses")
    hits = cache.hits
    [(status, again)] = text_handler([(body(), EXPLAIN)])
    assert status == 200 and again["explanation"]["cached"] is False
    assert again["explanation"]["target"]["index"] == again["predictions"][0]["index"]
    assert without_volatile(again["explanation"]) == without_volatile(first["explanation"])
    assert metric_count(text_handler, "ExplanationCacheMisses") == misses + 1 and cache.hits == hits
    [(_, third)] = text_handler([(body(), EXPLAIN)])  # the fresh explanation replaced the entry
    assert third["explanation"]["cached"] is True and third["explanation"]["target"] == first["explanation"]["target"]


def test_text_predictions_are_never_cached(text_handler, monkeypatch):
    text = "fresh predictions please"
    text_handler([({"data": text}, EXPLAIN)])
    calls = []
    runner = text_handler.handler.runner
    original = runner.forward
    monkeypatch.setattr(runner, "forward", lambda items, fused: calls.append([i.inputs for i in items])
                        or original(items, fused))
    [(_, body)] = text_handler([({"data": text}, EXPLAIN)])
    assert body["explanation"]["cached"] is True and calls == [[text]]


def test_text_model_version_covers_the_weights(text_handler, tmp_path):
    flow = text_handler.handler.flow
    model_dir = text_handler.context.system_properties["model_dir"]
    assert flow.cache_version == model_version(text_handler.context.manifest, fingerprint_files(model_dir))
    body = {"data": "a version of the weights", "target": 0}
    text_handler([(body, EXPLAIN)])
    [(_, hit)] = text_handler([(body, EXPLAIN)])
    flow.cache_version, saved = "other", flow.cache_version
    try:  # other weights: the same request is a miss
        [(_, other)] = text_handler([(body, EXPLAIN)])
    finally:
        flow.cache_version = saved
    assert hit["explanation"]["cached"] is True and other["explanation"]["cached"] is False


def test_text_cache_off(tmp_path):
    mar = build_text_mar(tmp_path, "nocache", "bert", config={"explain": {"n_steps": 4, "cache_mb": 0}})
    handler = InProcessHandler(unpack(mar, tmp_path / "unpacked"), "text_explainer", "TextExplainer")
    out = handler([({"data": "same"}, EXPLAIN), ({"data": "same"}, EXPLAIN)])
    out += handler([({"data": "same"}, EXPLAIN)])
    assert [body["explanation"]["cached"] for _, body in out] == [False, False, False]
    assert handler.handler.flow.cache_version == "" and metric_count(handler, "ExplanationCacheMisses") == 0


# --- image handler --------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_handler(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("image_cache")
    mar = build_image_mar(tmp, "pets", config={"handler": {"resize": 80, "crop": 64},
                                               "explain": {"target_layer": "layer2"}})
    return InProcessHandler(unpack(mar, tmp / "unpacked"), "image_explainer", "ImageExplainer")


def picture(seed):
    rng = np.random.default_rng(seed)
    return png(Image.fromarray(rng.integers(0, 255, (60, 70, 3), dtype=np.uint8)))


def test_image_repeat_hits_and_changes_miss(image_handler, monkeypatch):
    data = picture(1)
    [(_, first)] = image_handler([(data, EXPLAIN)])
    calls = []
    original = image_handler.handler.runner.gradcam.attribute
    monkeypatch.setattr(image_handler.handler.runner.gradcam, "attribute", lambda *a, **k: calls.append(a) or original(*a, **k))
    [(_, second)] = image_handler([(data, EXPLAIN)])
    assert first["explanation"]["cached"] is False and second["explanation"]["cached"] is True
    assert without_volatile(first["explanation"]) == without_volatile(second["explanation"])
    assert first["predictions"] == second["predictions"] and calls == []  # no Grad-CAM pass for a hit
    predicted = first["predictions"][0]["index"]
    other = (predicted + 1) % 3
    changes = [{"target": other}, {"outputs": ["heatmap", "overlay_png"]}, {"heatmap_size": "input"}]
    for change in changes:
        body = {"data": base64.b64encode(data).decode(), **change}
        [(status, answer)] = image_handler([(json.dumps(body).encode(), EXPLAIN)])
        assert status == 200 and answer["explanation"]["cached"] is False, change
    assert len(calls) == len(changes)
    # a batch mixing a hit, a miss and a prediction: each answered as if alone
    out = image_handler([(data, EXPLAIN), (picture(2), EXPLAIN), (picture(2), {})])
    assert [body["explanation"]["cached"] for _, body in out[:2]] == [True, False]
    assert out[2][1] == {p["label"]: p["probability"] for p in out[1][1]["predictions"]}


@contextmanager
def forwards(model):
    """The batch size of every forward pass of ``model`` while inside."""
    sizes = []
    handle = model.register_forward_pre_hook(lambda _module, args: sizes.append(args[0].shape[0]))
    try:
        yield sizes
    finally:
        handle.remove()


def image_body(data):
    def body(**fields):
        return json.dumps({"data": base64.b64encode(data).decode(), **fields}).encode()
    return body


def test_image_untargeted_miss_runs_one_forward(image_handler):
    handler = image_handler.handler
    assert handler.flow.cache.enabled
    with forwards(handler.model) as sizes:
        [(status, body)] = image_handler([(picture(10), EXPLAIN)])
    assert status == 200 and body["explanation"]["cached"] is False
    assert sizes == [1]  # the fused Grad-CAM pass; it gives the predictions too
    with forwards(handler.model) as sizes:  # misses, a hit and a prediction: still one pass
        out = image_handler([(picture(11), EXPLAIN), (picture(10), EXPLAIN), (picture(12), EXPLAIN), (picture(13), {})])
    assert [b["explanation"]["cached"] for _, b in out[:3]] == [False, True, False] and sizes == [4]
    with forwards(handler.model) as sizes:  # hits only: the prediction forward alone
        out += image_handler([(picture(11), EXPLAIN), (picture(12), EXPLAIN)])
    assert [b["explanation"]["cached"] for _, b in out[4:]] == [True, True] and sizes == [2]
    for _, answer in out[:3] + out[4:]:
        assert answer["explanation"]["target"]["index"] == answer["predictions"][0]["index"]
    assert not handler.model._forward_pre_hooks


def test_image_stale_predicted_hit_is_explained_again(image_handler):
    handler = image_handler.handler
    body = image_body(picture(20))
    first = plant_other_class(image_handler, body)
    misses, hits = metric_count(image_handler, "ExplanationCacheMisses"), handler.flow.cache.hits
    with forwards(handler.model) as sizes:
        [(status, again)] = image_handler([(body(), EXPLAIN)])
    assert status == 200 and again["explanation"]["cached"] is False
    assert again["predictions"] == first["predictions"]
    assert again["explanation"]["target"] == first["explanation"]["target"]
    assert again["explanation"]["target"]["index"] == again["predictions"][0]["index"]
    np.testing.assert_allclose(again["explanation"]["heatmap"]["values"], first["explanation"]["heatmap"]["values"],
                               atol=2e-3)
    assert sizes == [1, 1]  # the prediction forward, then a Grad-CAM pass of the stale row
    assert metric_count(image_handler, "ExplanationCacheMisses") == misses + 1 and handler.flow.cache.hits == hits
    [(_, third)] = image_handler([(body(), EXPLAIN)])  # the fresh explanation replaced the entry
    assert third["explanation"]["cached"] is True and third["explanation"]["target"] == first["explanation"]["target"]

    # beside a fresh miss: the fused pass of the batch, then the stale row alone
    stale = image_body(picture(22))
    plant_other_class(image_handler, stale)
    with forwards(handler.model) as sizes:
        out = image_handler([(picture(23), EXPLAIN), (stale(), EXPLAIN)])
    assert sizes == [2, 1] and [b["explanation"]["cached"] for _, b in out] == [False, False]
    for _, answer in out:
        assert answer["explanation"]["target"]["index"] == answer["predictions"][0]["index"]


def test_image_stale_hit_whose_contrast_is_now_predicted(image_handler):
    handler = image_handler.handler
    body = image_body(picture(30))
    [(_, first)] = image_handler([(body(), EXPLAIN)])
    predicted = first["predictions"][0]["index"]
    other = (predicted + 1) % 3
    [(status, _)] = image_handler([(body(contrast=predicted), EXPLAIN)])
    assert status == 400  # the predicted class as the contrast, without the cache
    # the key of that request (the one it looks up), holding an explanation of another class against it
    looked_up = []
    cache = handler.flow.cache
    original = cache.get
    cache.get = lambda key: looked_up.append(key) or original(key)
    try:
        image_handler([(body(contrast=predicted), EXPLAIN)])
    finally:
        del cache.get
    [key] = looked_up
    [(_, named)], [explicit] = new_keys(image_handler, [(body(target=other, contrast=predicted), EXPLAIN)])
    handler.flow.cache.put(key, json.loads(handler.flow.cache._entries[explicit]))
    with forwards(handler.model) as sizes:
        [(status, answer)] = image_handler([(body(contrast=predicted), EXPLAIN)])
    assert status == 400 and answer["type"] == "bad_contrast" and sizes == [1]
