"""End to end through a real TorchServe 0.12 on free loopback ports, demo MARs."""
import base64
import io
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from harness import png
from tsexplain.tools.synthetic import reviews, shapes

pytestmark = pytest.mark.server
HELD_OUT_SEED = 20261123


@pytest.fixture(scope="module")
def server(demo_store, tmp_path_factory):
    from tsexplain.tools.launcher import TorchServe

    workdir = tmp_path_factory.mktemp("torchserve")
    ts = TorchServe(demo_store, {"shapes": "shapes.mar", "reviews": "reviews.mar"}, workdir)
    with ts:
        yield ts


@pytest.fixture(scope="module")
def image_size(demo_store):
    return json.loads((demo_store.parent / "demo" / "shapes" / "training.json").read_text())["image_size"]


def call(server, route, model, body, headers=None):
    status, raw = server.request("POST", f"{server.inference_url}/{route}/{model}", body, headers)
    return status, json.loads(raw)


def post_json(server, route, model, payload, headers=None):
    return call(server, route, model, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})


def test_token_authorization_is_on(server):
    status, _ = server.request("POST", f"{server.inference_url}/predictions/shapes", b"x",
                               {"Authorization": "Bearer wrong"})
    assert status in (400, 401)


def test_shapes_predictions_are_right(server, image_size):
    samples = shapes.generate(20, HELD_OUT_SEED, image_size)
    correct = 0
    for sample in samples:
        status, body = call(server, "predictions", "shapes", png(sample.image))
        assert status == 200 and len(body) == 5
        correct += next(iter(body)) == shapes.SHAPE_CLASSES[sample.label]
    assert correct >= 18


def test_shapes_explanation_points_at_the_object(server, image_size):
    samples = shapes.generate(20, HELD_OUT_SEED + 1, image_size)
    hits = 0
    for sample in samples:
        raw_status, raw = server.request("POST", f"{server.inference_url}/explanations/shapes", png(sample.image))
        assert raw_status == 200 and len(raw) <= 20_000
        body = json.loads(raw)
        heatmap = np.array(body["explanation"]["heatmap"]["values"])
        h, w = heatmap.shape
        assert h >= 7 and w >= 7 and 0 <= heatmap.min() and heatmap.max() <= 1
        assert body["explanation"]["target"]["index"] == body["predictions"][0]["index"]
        y, x = np.unravel_index(heatmap.argmax(), heatmap.shape)
        cx, cy = (x + 0.5) * image_size / w, (y + 0.5) * image_size / h
        x0, y0, x1, y1 = sample.box
        hits += x0 <= cx <= x1 and y0 <= cy <= y1
    assert hits >= 18


def test_overlay_on_the_original_image(server, image_size):
    sample = shapes.generate(1, HELD_OUT_SEED + 2, image_size)[0]
    big = sample.image.resize((image_size * 4, image_size * 4), Image.LANCZOS)
    payload = {"data": base64.b64encode(png(big)).decode(), "outputs": ["heatmap", "overlay_png"],
               "target": shapes.SHAPE_CLASSES[sample.label], "heatmap_size": "input"}
    status, body = post_json(server, "explanations", "shapes", payload)
    assert status == 200
    assert body["explanation"]["heatmap"]["shape"] == [image_size, image_size]
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["explanation"]["overlay_png"]))).convert("RGB")).astype(int)
    original = np.asarray(big).astype(int)
    assert overlay.shape == original.shape
    # Where the overlay changed the image most lies in the object's box (scaled 4x).
    change = np.abs(overlay - original).sum(axis=2)
    y, x = np.unravel_index(change.argmax(), change.shape)
    x0, y0, x1, y1 = (4 * v for v in sample.box)
    assert x0 - 8 <= x <= x1 + 8 and y0 - 8 <= y <= y1 + 8


def test_bad_requests_get_4xx_json_and_the_worker_survives(server, image_size):
    def worker_pid():
        status, raw = server.request("GET", f"{server.management_url}/models/shapes", api="management")
        return json.loads(raw)[0]["workers"][0]["pid"]

    pid = worker_pid()
    cases = [
        (b"random bytes \x00\x01", {}, "bad_image"),
        (b'{"data": "abc', {"Content-Type": "application/json"}, "bad_json"),
        (json.dumps({"data": "%%%"}).encode(), {"Content-Type": "application/json"}, "bad_base64"),
    ]
    for body, headers, kind in cases:
        status, answer = call(server, "explanations", "shapes", body, headers)
        assert status == 400 and answer["type"] == kind and answer["code"] == 400 and answer["message"]
    image = base64.b64encode(png(shapes.generate(1, 3, image_size)[0].image)).decode()
    for payload, kind in [({"data": image, "target": "hexagon"}, "unknown_target"),
                          ({"data": image, "target": 99}, "unknown_target"),
                          ({"data": image, "method": "lime"}, "unknown_method")]:
        status, answer = post_json(server, "explanations", "shapes", payload)
        assert status == 400 and answer["type"] == kind
    status, _ = call(server, "predictions", "shapes", base64.b64decode(image))
    assert status == 200 and worker_pid() == pid


def test_concurrent_mixed_traffic_forms_batches_and_answers_each_alone(server, image_size):
    samples = shapes.generate(8, HELD_OUT_SEED + 3, image_size)
    alone = [call(server, "predictions", "shapes", png(s.image))[1] for s in samples]
    jobs = []
    for i, sample in enumerate(samples):
        jobs.append(("predictions", png(sample.image), i))
        jobs.append(("explanations", png(sample.image), i))
        jobs.append(("explanations", b"garbage", None))

    def run(job):
        route, body, i = job
        return job, call(server, route, "shapes", body)

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(run, jobs * 2))
    for (route, _, i), (status, body) in results:
        if i is None:
            assert status == 400 and body["type"] == "bad_image"
        elif route == "predictions":
            assert status == 200 and list(body) == list(alone[i])
            np.testing.assert_allclose(list(body.values()), list(alone[i].values()), atol=1e-4)
        else:
            assert status == 200 and body["predictions"][0]["label"] == next(iter(alone[i]))
    time.sleep(1)
    sizes = [int(m) for m in re.findall(r"batch size=(\d+) explained=\d+", server.log_text())]
    assert max(sizes) > 1, "no batch of more than one request formed"


def test_predictions_unchanged_by_explanations(server, image_size):
    data = png(shapes.generate(1, HELD_OUT_SEED + 4, image_size)[0].image)
    _, before = call(server, "predictions", "shapes", data)
    call(server, "explanations", "shapes", data)
    _, after = call(server, "predictions", "shapes", data)
    assert before == after


def test_reviews_predictions_and_cue_words_lead(server):
    samples = reviews.generate(20, HELD_OUT_SEED)
    correct = hits = 0
    for sample in samples:
        status, body = call(server, "predictions", "reviews", sample.text.encode())
        assert status == 200
        correct += next(iter(body)) == reviews.LABELS[sample.label]
        status, body = post_json(server, "explanations", "reviews", {"data": sample.text, "top_k": 3})
        assert status == 200
        explanation = body["explanation"]
        assert explanation["convergence_delta"]["relative"] < 0.05
        start, end = sample.sentiment_span
        hits += any(w["start"] <= start < w["end"] or start <= w["start"] < end for w in explanation["top_words"])
    assert correct >= 19 and hits >= 18


def test_reviews_bad_input(server):
    for body, kind in [(b"   ", "empty_text"), (b"\xc3\x28 invalid", "bad_encoding")]:
        status, answer = call(server, "explanations", "reviews", body)
        assert status == 400 and answer["type"] == kind
