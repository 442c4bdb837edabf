"""The bad-input matrix through a real TorchServe: clear 4xx JSON, worker never restarted.

Image and text MARs are built from weights the test makes; every bad request is
sent together with good ones so that they share batches.
"""
import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from harness import build_image_mar, build_text_mar, has_internals, png

pytestmark = pytest.mark.server
MAX_REQUEST_BYTES = 2_000_000


def encode(image, fmt, **save):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def good_image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tsexplain.tools.launcher import TorchServe

    tmp = tmp_path_factory.mktemp("bad_input")
    config = {"batchSize": 8, "maxBatchDelay": 50,
              "handler": {"resize": 64, "crop": 64, "max_image_pixels": 4_000_000}, "explain": {"target_layer": "layer2"}}
    build_image_mar(tmp, "pets", config=config)
    build_text_mar(tmp, "notes", config={"batchSize": 8, "maxBatchDelay": 50, "explain": {"max_n_steps": 64}})
    properties = {"max_request_size": str(MAX_REQUEST_BYTES), "max_response_size": str(MAX_REQUEST_BYTES)}
    models = {"pets": "pets.mar", "notes": "notes.mar", "oom": "notes.mar", "broken": "pets.mar", "slow": "notes.mar"}
    env = {"TSEXPLAIN_OOM_INJECT_FAULT": "oom", "TSEXPLAIN_BROKEN_INJECT_FAULT": "error"}
    # 1,024 forward and backward passes of one row each cannot fit in 50 ms.
    env.update({"TSEXPLAIN_SLOW_DEADLINE_MS": "50", "TSEXPLAIN_SLOW_MAX_N_STEPS": "1024",
                "TSEXPLAIN_SLOW_N_STEPS": "1024", "TSEXPLAIN_SLOW_INTERNAL_BATCH_SIZE": "1"})
    with TorchServe(tmp / "store", models, tmp / "ts", properties=properties, env=env) as ts:
        yield ts


def worker_pids(server):
    pids = {}
    for model in ("pets", "notes", "oom", "broken", "slow"):
        _, raw = server.request("GET", f"{server.management_url}/models/{model}", api="management")
        pids[model] = [w["pid"] for w in json.loads(raw)[0]["workers"]]
    return pids


def image_cases():
    rgb = good_image()
    jpeg = encode(rgb, "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    bomb = encode(Image.new("L", (4000, 1500)), "PNG")  # 6 Mpx, over the 4 Mpx cap, tiny file
    return {
        # (body, content type, route) -> expected status, expected error type (None: success)
        "empty body": (b"", "application/octet-stream", 400, "empty_body"),
        "random bytes": (bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8)), None, 400, "bad_image"),
        "truncated jpeg": (jpeg[: len(jpeg) // 2], None, 400, "bad_image"),
        "truncated png": (png(rgb)[:200], None, 400, "bad_image"),
        "1x1": (png(Image.new("RGB", (1, 1))), None, 200, None),
        "grayscale": (png(rgb.convert("L")), None, 200, None),
        "rgba": (png(rgb.convert("RGBA")), None, 200, None),
        "cmyk": (encode(rgb.convert("CMYK"), "JPEG"), None, 200, None),
        "16-bit": (png(Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 20).astype(np.uint16))), None, 200, None),
        "palette": (png(rgb.convert("P")), None, 200, None),
        "animated gif": (gif.getvalue(), None, 200, None),
        "exif rotated": (encode(rgb, "JPEG", exif=exif), None, 200, None),
        "decompression bomb": (bomb, None, 413, "image_too_large"),
        "invalid json": (b'{"data": "x', "application/json", 400, "bad_json"),
        "invalid base64": (json.dumps({"data": "***"}).encode(), "application/json", 400, "bad_base64"),
        "wrong types": (json.dumps({"data": b64(png(rgb)), "top_k": "five"}).encode(), "application/json", 400, "bad_top_k"),
        "json array": (b"[1, 2]", "application/json", 400, "bad_json"),
        "unknown label": (json.dumps({"data": b64(png(rgb)), "target": "unicorn"}).encode(), "application/json", 400, "unknown_target"),
        "index out of range": (json.dumps({"data": b64(png(rgb)), "target": 3}).encode(), "application/json", 400, "unknown_target"),
        "unknown method": (json.dumps({"data": b64(png(rgb)), "method": "lime"}).encode(), "application/json", 400, "unknown_method"),
    }


def text_cases():
    return {
        "non-utf8": (b"caf\xe9 \xff", "application/octet-stream", 400, "bad_encoding"),
        "empty": (b"", "text/plain", 400, "empty_text"),
        "whitespace": (b" \n\t ", "text/plain", 400, "empty_text"),
        "1 MB of text": (("word " * 200_000).encode(), "text/plain", 413, "text_too_long"),
        "n_steps too big": (json.dumps({"data": "ok", "n_steps": 65}).encode(), "application/json", 400, "bad_n_steps"),
        "n_steps zero": (json.dumps({"data": "ok", "n_steps": 0}).encode(), "application/json", 400, "bad_n_steps"),
        "unknown method": (json.dumps({"data": "ok", "method": "shap"}).encode(), "application/json", 400, "unknown_method"),
        "unknown label": (json.dumps({"data": "ok", "target": "angry"}).encode(), "application/json", 400, "unknown_target"),
        "unicode": ("naïve café 😀 服务很好 שלום".encode(), "text/plain", 200, None),
    }


def send(server, model, case):
    body, content_type, _, _ = case
    headers = {"Content-Type": content_type} if content_type else {}
    return server.request("POST", f"{server.inference_url}/explanations/{model}", body, headers)


@pytest.mark.parametrize("model,cases", [("pets", image_cases), ("notes", text_cases)])
def test_matrix_in_mixed_batches(server, model, cases):
    before = worker_pids(server)
    matrix = cases()
    good = ("pets", (png(good_image()), None, 200, None)) if model == "pets" else ("notes", (b"fine", "text/plain", 200, None))
    jobs = [(name, (model, case)) for name, case in matrix.items()] + [("good", good)] * len(matrix)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda job: (job[0], job[1][1], send(server, *job[1])), jobs))
    for name, (_, _, status, kind), (got_status, raw) in results:
        body = json.loads(raw)
        assert got_status == status, (name, got_status, raw[:200])
        if kind is None:
            assert body["explanation"] is not None, name
        else:
            assert body["type"] == kind and body["code"] == status and body["message"], name
            assert not has_internals(raw), name
    assert worker_pids(server) == before


def test_request_over_max_request_size(server):
    status, _ = server.request("POST", f"{server.inference_url}/predictions/pets", b"\0" * (MAX_REQUEST_BYTES + 10))
    assert status == 413
    status, _ = server.request("POST", f"{server.inference_url}/predictions/pets", png(good_image()))
    assert status == 200


@pytest.mark.parametrize("model,body,status,kind", [
    ("oom", b"fine", 507, "out_of_memory"),
    ("broken", png(good_image()), 503, "explanation_failed"),
])
def test_injected_explanation_faults_fail_alone(server, model, body, status, kind):
    """A failing explanation answers 503/507 JSON; predictions in the same batches
    still succeed and the worker is not restarted."""
    before = worker_pids(server)
    headers = {"Content-Type": "text/plain"} if model == "oom" else {}
    jobs = [("explanations", body), ("predictions", body)] * 4

    def run(job):
        route, data = job
        return route, server.request("POST", f"{server.inference_url}/{route}/{model}", data, headers)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, jobs))
    for route, (got, raw) in results:
        answer = json.loads(raw)
        if route == "explanations":
            assert got == status and answer["type"] == kind and not has_internals(raw)
        else:
            assert got == 200 and answer
    assert worker_pids(server) == before


def test_explanation_past_its_deadline_answers_504_and_the_worker_goes_on(server):
    """explain.deadline_ms (here 50 ms, from the environment) stops Layer IG between
    forwards: 504 for the explanations, 200 for predictions in the same batches,
    the same worker, and the model answers afterwards."""
    before = worker_pids(server)
    headers = {"Content-Type": "text/plain"}
    jobs = [("explanations", f"slow review {i}".encode()) for i in range(3)] + [("predictions", b"a fine meal")] * 3

    def run(job):
        route, data = job
        return route, server.request("POST", f"{server.inference_url}/{route}/slow", data, headers, timeout=60)

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(run, jobs))
    for route, (status, raw) in results:
        body = json.loads(raw)
        if route == "explanations":
            assert status == 504 and body["type"] == "deadline_exceeded" and "50 ms" in body["message"], raw
            assert not has_internals(raw)
        else:
            assert status == 200 and set(body) == {"negative", "neutral", "positive"}
    status, raw = server.request("POST", f"{server.inference_url}/predictions/slow", b"and afterwards", headers)
    assert status == 200 and set(json.loads(raw)) == {"negative", "neutral", "positive"}
    assert worker_pids(server) == before


def test_no_image_bytes_or_heatmaps_in_logs_or_captured_output(server):
    """Images (raw and base64), overlays and heatmaps appear in no log file and not
    in the captured output, also for undecodable images."""
    rng = np.random.default_rng(20261124)
    image = png(Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)))
    junk = bytes(rng.integers(0, 256, 600, dtype=np.uint8))
    url = f"{server.inference_url}/explanations/pets"
    assert server.request("POST", f"{server.inference_url}/predictions/pets", image)[0] == 200
    status, raw = server.request("POST", url, json.dumps({"data": b64(image), "outputs": ["heatmap", "overlay_png"]}).encode(),
                                 {"Content-Type": "application/json"})
    assert status == 200
    explanation = json.loads(raw)["explanation"]
    assert server.request("POST", url, junk)[0] == 400
    assert server.request("POST", url, json.dumps({"data": b64(junk)}).encode(), {"Content-Type": "application/json"})[0] == 400
    time.sleep(2)  # let the frontend flush its log appenders
    needles = [b64(image)[64:128], b64(junk)[:64], b64(junk)[64:128], explanation["overlay_png"][64:128],
               json.dumps(explanation["heatmap"]["values"][3], separators=(",", ":")), junk[100:116].hex()]
    outputs = server.output_files()
    assert "logs/model_log.log" in outputs and "torchserve.out" in outputs
    for needle in needles:
        for path, text in outputs.items():
            assert needle not in text, (needle, path)
