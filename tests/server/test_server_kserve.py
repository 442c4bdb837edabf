"""KServe v1 and v2 routes through a real TorchServe with its stock service envelopes.

``service_envelope`` is a server-wide ``config.properties`` key in TorchServe 0.12
(the frontend sends ``ConfigManager.getTsServiceEnvelope()`` with every model load;
the model config YAML has no such key). Each envelope gets its own server with a
tiny image MAR and a tiny text MAR; every instance of a KServe request must get
what the same request would get alone on ``/explanations`` or ``/predictions``.
"""
import base64
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from harness import build_image_mar, build_text_mar, png

pytestmark = pytest.mark.server
BATCHING = {"batchSize": 4, "maxBatchDelay": 300}


@pytest.fixture(scope="module", params=["kserve", "kservev2"])
def server(request, tmp_path_factory):
    from tsexplain.tools.launcher import TorchServe

    tmp = tmp_path_factory.mktemp(f"ks-{request.param}")
    build_image_mar(tmp, "img", labels=("cat", "dog", "owl"), config={**BATCHING, "handler": {"resize": 64, "crop": 64}})
    build_text_mar(tmp, "txt", config={**BATCHING, "explain": {"max_instances": 3}})
    with TorchServe(tmp / "store", {"img": "img.mar", "txt": "txt.mar"}, tmp / "ts",
                    properties={"service_envelope": request.param}) as ts:
        ts.envelope = request.param
        yield ts


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [png(Image.fromarray(rng.integers(0, 255, (40 + 7 * i, 50, 3), dtype=np.uint8))) for i in range(n)]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def post(server, path, payload, headers=None):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    content_type = "application/octet-stream" if isinstance(payload, bytes) else "application/json"
    status, raw = server.request("POST", server.inference_url + path, body, {"Content-Type": content_type, **(headers or {})})
    return status, json.loads(raw)


def close(a, b, tol=2e-3):
    return np.allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), atol=tol)


def same_image_answer(batched, alone):
    assert [p["index"] for p in batched["predictions"]] == [p["index"] for p in alone["predictions"]]
    assert close([p["probability"] for p in batched["predictions"]], [p["probability"] for p in alone["predictions"]], 1e-4)
    assert batched["explanation"]["target"] == alone["explanation"]["target"]
    assert close(batched["explanation"]["heatmap"]["values"], alone["explanation"]["heatmap"]["values"])


def test_envelope_is_passed_through(server):
    assert "requests pass through; the handler reads KServe v1/v2 bodies" in server.log_text()


def test_v1_explain_answers_each_instance_as_if_alone(server):
    pictures = images(2)
    instances = [{"data": b64(pictures[0]), "target": "dog"}, b64(pictures[1])]
    status, body = post(server, "/v1/models/img:explain", {"instances": instances, "parameters": {"outputs": ["heatmap"]}})
    assert status == 200 and list(body) == ["explanations"] and len(body["explanations"]) == 2
    first, second = body["explanations"]
    assert first["explanation"]["target"]["label"] == "dog"
    for entry, picture, target in [(first, pictures[0], "dog"), (second, pictures[1], "predicted")]:
        status, alone = post(server, "/explanations/img", {"data": b64(picture), "target": target, "outputs": ["heatmap"]})
        assert status == 200
        same_image_answer(entry, alone)
    assert second["explanation"]["target"]["index"] == second["predictions"][0]["index"]


def test_v1_bad_instance_gets_its_error_entry_only(server):
    good = b64(images(1)[0])
    status, body = post(server, "/v1/models/img:explain", {"instances": [{"data": good}, {"data": "%%%"},
                                                                       {"data": good, "target": "zebra"}]})
    assert status == 200
    ok, bad, unknown = body["explanations"]
    assert ok["explanation"]["method"] == "gradcam"
    assert bad["code"] == 400 and bad["type"] == "bad_base64" and bad["error"]
    assert unknown["code"] == 400 and unknown["type"] == "unknown_target"
    status, body = post(server, "/v1/models/img:explain", {"instances": ["%%%", {"data": good, "method": "lime"}]})
    assert status == 400 and [e["type"] for e in body["explanations"]] == ["bad_base64", "unknown_method"]


def test_v1_predict_matches_predictions_route(server):
    pictures = images(3, seed=1)
    status, body = post(server, "/v1/models/img:predict", {"instances": [{"b64": b64(p)} for p in pictures]})
    assert status == 200 and len(body["predictions"]) == 3
    for entry, picture in zip(body["predictions"], pictures):
        status, alone = post(server, "/predictions/img", picture)
        assert status == 200 and list(entry) == list(alone) and close(list(entry.values()), list(alone.values()), 1e-4)


def test_v1_text_explain_batch(server):
    texts = ["the soup was great", "never again, awful service and cold food"]
    status, body = post(server, "/v1/models/txt:explain",
                        {"instances": [texts[0], {"data": texts[1], "target": "negative"}], "parameters": {"n_steps": 16}})
    assert status == 200 and len(body["explanations"]) == 2
    for entry, text, target in zip(body["explanations"], texts, ["predicted", "negative"]):
        status, alone = post(server, "/explanations/txt", {"data": text, "target": target, "n_steps": 16})
        assert status == 200
        assert entry["explanation"]["target"] == alone["explanation"]["target"]
        assert [w["word"] for w in entry["explanation"]["words"]] == [w["word"] for w in alone["explanation"]["words"]]
        assert close([w["attribution"] for w in entry["explanation"]["words"]],
                     [w["attribution"] for w in alone["explanation"]["words"]], 1e-4)
        assert entry["explanation"]["n_steps"] == 16


def v2_body(strings, **extra):
    return {"id": "req-42", "inputs": [{"name": "input-0", "shape": [len(strings)], "datatype": "BYTES",
                                        "data": strings}], **extra}


def test_v2_explain_text_and_image(server):
    texts = ["the soup was great", "cold food"]
    strings = [texts[0], json.dumps({"data": texts[1], "target": "positive"})]
    status, body = post(server, "/v2/models/txt/explain", v2_body(strings, parameters={"n_steps": 8}))
    assert status == 200 and body["id"] == "req-42" and body["model_name"] == "txt"
    output = body["outputs"][0]
    assert output["name"] == "explanations" and output["datatype"] == "BYTES" and output["shape"] == [2]
    entries = [json.loads(s) for s in output["data"]]
    assert entries[1]["explanation"]["target"]["label"] == "positive"
    for entry, text, target in zip(entries, texts, ["predicted", "positive"]):
        _, alone = post(server, "/explanations/txt", {"data": text, "target": target, "n_steps": 8})
        assert close([w["attribution"] for w in entry["explanation"]["words"]],
                     [w["attribution"] for w in alone["explanation"]["words"]], 1e-4)

    pictures = images(2, seed=2)
    status, body = post(server, "/v2/models/img/explain", v2_body([b64(p) for p in pictures] + ["not an image"]))
    assert status == 200
    entries = [json.loads(s) for s in body["outputs"][0]["data"]]
    assert [e["explanation"]["method"] for e in entries[:2]] == ["gradcam", "gradcam"]
    assert entries[2]["code"] == 400 and entries[2]["type"] in ("bad_base64", "bad_image")


def test_v2_infer(server):
    status, body = post(server, "/v2/models/txt/infer", v2_body(["the soup was great", "awful"]))
    assert status == 200 and body["outputs"][0]["name"] == "predictions"
    entries = [json.loads(s) for s in body["outputs"][0]["data"]]
    for entry, text in zip(entries, ["the soup was great", "awful"]):
        status, raw = server.request("POST", f"{server.inference_url}/predictions/txt", text.encode(),
                                     {"Content-Type": "text/plain"})
        alone = json.loads(raw)
        assert list(entry) == list(alone) and close(list(entry.values()), list(alone.values()), 1e-5)


def test_bad_kserve_requests(server):
    cases = [
        ("/v1/models/txt:explain", {"instances": []}, 400, "bad_kserve_request"),
        ("/v1/models/txt:explain", {"instances": ["a"], "signature_name": "x"}, 400, "bad_kserve_request"),
        ("/v1/models/txt:explain", {"instances": ["a", "b", "c", "d"]}, 413, "too_many_instances"),
        ("/v2/models/txt/explain", {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1.0]}]},
         400, "bad_kserve_request"),
        ("/v2/models/txt/explain", v2_body(["a", "b"]) | {"inputs": [{"name": "x", "shape": [3], "datatype": "BYTES",
                                                                      "data": ["a", "b"]}]}, 400, "bad_kserve_request"),
    ]
    for path, payload, code, kind in cases:
        status, body = post(server, path, payload)
        assert (status, body["type"], body["code"]) == (code, kind, code), (path, payload, body)
        assert body["error"]


def test_plain_routes_still_work_under_the_envelope(server):
    picture = images(1, seed=3)[0]
    status, body = post(server, "/predictions/img", picture)
    assert status == 200 and set(body) <= {"cat", "dog", "owl"}
    status, body = post(server, "/explanations/img", picture)
    assert status == 200 and body["explanation"]["method"] == "gradcam"


def test_concurrent_kserve_and_plain_requests_in_one_batch(server):
    """The stock envelopes read the first request of a batch only; here every request
    of the batches TorchServe forms gets its own right answer."""
    pictures = images(4, seed=4)
    calls = []
    for i, picture in enumerate(pictures):
        calls.append(("/v1/models/img:explain", {"instances": [b64(picture), {"data": b64(picture), "target": i % 3}]}))
        calls.append(("/predictions/img", picture))
    with ThreadPoolExecutor(len(calls)) as pool:
        results = list(pool.map(lambda c: post(server, *c), calls))
    for (path, payload), (status, body) in zip(calls, results):
        assert status == 200, body
        if path.startswith("/v1"):
            first, second = body["explanations"]
            assert first["predictions"] == second["predictions"] or close(
                [p["probability"] for p in first["predictions"]], [p["probability"] for p in second["predictions"]], 1e-5)
            assert second["explanation"]["target"]["index"] == calls.index((path, payload)) // 2 % 3
        else:
            assert set(body) <= {"cat", "dog", "owl"}
    sizes = [int(line.split("batch size=")[1].split()[0]) for line in server.log_text().splitlines() if "batch size=" in line]
    assert max(sizes) > 1  # batches of several HTTP requests really formed
