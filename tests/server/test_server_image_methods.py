"""Image methods through a real TorchServe: every method in one concurrent burst (batches
form), the allowed-methods gate, and log lines by method."""
import base64
import json
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from harness import build_image_mar, png

pytestmark = pytest.mark.server
METHODS = ["gradcam", "gradcam++", "layercam", "layer_ig", "integrated_gradients"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tsexplain.tools.launcher import TorchServe

    tmp = tmp_path_factory.mktemp("image_methods")
    config = {"batchSize": 8, "maxBatchDelay": 200, "handler": {"resize": 40, "crop": 32},
              "explain": {"target_layer": "layer2", "methods": METHODS[:4], "n_steps": 8}}
    build_image_mar(tmp, "pets", labels=("cat", "dog", "owl"), config=config)
    with TorchServe(tmp / "store", {"pets": "pets.mar"}, tmp / "ts") as ts:
        yield ts


def body(seed, **fields):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8))
    return json.dumps({"data": base64.b64encode(png(image)).decode(), **fields}).encode()


def post(server, data):
    status, raw = server.request("POST", f"{server.inference_url}/explanations/pets", data,
                                 {"Content-Type": "application/json"})
    return status, json.loads(raw)


def test_methods_in_one_burst(server):
    requests = [body(i, method=m, target="owl", contrast="cat") for i, m in enumerate(METHODS * 2)]
    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda d: post(server, d), requests))
    for (status, answer), method in zip(answers, METHODS * 2):
        if method == "integrated_gradients":  # not in explain.methods
            assert status == 403 and answer["type"] == "method_not_allowed"
            continue
        assert status == 200, answer
        explanation = answer["explanation"]
        assert explanation["method"] == method and explanation["contrast"] == {"index": 0, "label": "cat"}
        assert explanation["heatmap"]["shape"] == [4, 4]
    log = server.log_text()
    assert "explanation method=gradcam++ layer=layer2" in log and "explanation method=layer_ig layer=layer2" in log
    assert max(int(n) for n in re.findall(r"batch size=(\d+)", log)) > 1  # methods met in batches
