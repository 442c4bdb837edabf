"""The handlers under ``asyncCommunication``, in process: driven by TorchServe's own
async service (``ts.async_service.predict``) with the worker socket decoded as the
frontend reads it. Answers equal the synchronous handler's; each request gets its
answer message (streamed when 2xx, whole when an error) and then its end of stream."""
import asyncio
import base64
import io
import json
import socket
import sys

import numpy as np
import pytest
from PIL import Image
from ts import async_service
from ts.service import Service

from harness import (EXPLAIN, InProcessHandler, RecordingMetrics, build_image_mar, build_text_mar, decode_message, png,
                     unpack)
from tsexplain.serving.errors import ConfigError

TEXT_LABELS = ("negative", "neutral", "positive")
IMAGE_LABELS = ("cat", "dog", "owl")


class AsyncWorker:
    """A handler loaded as TorchServe's worker loads it with ``asyncCommunication``."""

    def __init__(self, model_dir, module: str, class_name: str):
        manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
        sys.path.insert(0, str(model_dir))
        try:
            handler_class = getattr(__import__(module), class_name)
        finally:
            sys.path.remove(str(model_dir))
        self.handler = handler_class()
        service = Service(manifest["model"]["modelName"], str(model_dir), manifest, self.handler.handle, None, 1,
                          metrics_cache=RecordingMetrics())
        self.handler.initialize(service.context)  # finds `service` here, as in TsModelLoader.load
        self.worker, self.frontend = socket.socketpair()
        service.set_cl_socket(self.worker)
        self.service = service

    def __call__(self, requests):
        """``requests``: (body, headers), each its own frontend message, all at once.
        Returns (answer messages in the order sent, final messages), each {request id: entry}."""

        def message(i, body, headers):
            if isinstance(body, dict):
                value, content_type = body, "application/json"
            else:
                value, content_type = body, "application/octet-stream"
            return [{"requestId": f"req-{i}".encode(), "headers": [{"name": k.encode(), "value": v.encode()}
                                                                    for k, v in headers.items()],
                     "parameters": [{"name": "body", "value": value, "contentType": content_type}]}]

        async def run():
            return await asyncio.gather(*(async_service.predict(self.service, message(i, body, headers))
                                          for i, (body, headers) in enumerate(requests)))

        finals = asyncio.run(asyncio.wait_for(run(), 120))
        first = []
        self.frontend.settimeout(0.2)
        try:
            while True:
                code, entries = decode_message(self.frontend)
                assert code == 200
                first.append(entries)
        except (TimeoutError, socket.timeout):
            pass
        self.frontend.settimeout(None)
        decoded = []
        for raw in finals:
            code, entries = decode_message(BytesSocket(bytes(raw)))
            assert code == 200  # never a batch-wide error: it would fail every request in the worker
            decoded.append(entries)
        return first, decoded

    def close(self):
        self.worker.close()
        self.frontend.close()


class BytesSocket:
    def __init__(self, data: bytes):
        self.stream = io.BytesIO(data)

    def recv(self, n: int) -> bytes:
        return self.stream.read(n)


def merged(messages) -> dict:
    return {rid: entry for message in messages for rid, entry in message.items()}


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("concurrent_text")
    explain = {"n_steps": 16, "max_n_steps": 1024, "cache_mb": 0}
    concurrent = build_text_mar(tmp, "conc", config={"asyncCommunication": True, "explain": explain}, labels=TEXT_LABELS)
    plain = build_text_mar(tmp, "plain", config={"explain": explain}, labels=TEXT_LABELS)
    worker = AsyncWorker(unpack(concurrent, tmp / "conc"), "text_explainer", "TextExplainer")
    yield worker, InProcessHandler(unpack(plain, tmp / "plain"), "text_explainer", "TextExplainer")
    worker.close()


def test_each_request_gets_its_answer_then_its_end_of_stream(text):
    worker, _ = text
    first, finals = worker([({"data": "the soup was cold"}, {}), ({"data": "rude", "n_steps": 5000}, EXPLAIN)])
    answers = merged(first)
    assert [list(m) for m in first] == [["req-0"], ["req-1"]]
    prediction, error = answers["req-0"], answers["req-1"]
    assert prediction["status"] == 200 and prediction["headers"]["ts_stream_next"] == "true"
    assert set(json.loads(prediction["body"])) == set(TEXT_LABELS)
    # an error is a whole response (TorchServe closes the connection after it, as on every error)
    assert error["status"] == 400 and "ts_stream_next" not in error["headers"]
    assert json.loads(error["body"])["type"] == "bad_n_steps"
    for final, rid in zip(finals, ("req-0", "req-1")):
        assert list(final) == [rid]
        assert final[rid]["headers"]["ts_stream_next"] == "false" and final[rid]["body"] == b""


def test_predictions_go_before_the_explanation_work_with_the_same_answers(text):
    worker, plain = text
    requests = [({"data": " ".join(["the staff were rude but the soup was great"] * 4), "n_steps": 512}, EXPLAIN),
                ({"data": "the soup was cold"}, {}), ({"data": "a lovely evening"}, {})]
    first, _ = worker(requests)
    assert [rid for message in first for rid in message] == ["req-1", "req-2", "req-0"]
    answers = merged(first)
    for i, (body, headers) in enumerate(requests):
        [(status, alone)] = plain([(body, headers)])
        assert answers[f"req-{i}"]["status"] == status == 200
        got = json.loads(answers[f"req-{i}"]["body"])
        if i == 0:
            a, b = got["explanation"], alone["explanation"]
            assert a["target"] == b["target"] and a["n_steps"] == b["n_steps"] == 512
            np.testing.assert_allclose([t["attribution"] for t in a["tokens"]],
                                       [t["attribution"] for t in b["tokens"]], atol=1e-5)
        else:
            assert got == pytest.approx(alone, abs=1e-6)


def picture(seed):
    rng = np.random.default_rng(seed)
    return png(Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)))


def image_request(seed, **fields):
    return {"data": base64.b64encode(picture(seed)).decode(), **fields}


def test_image_maps_from_the_explanation_lane_equal_the_synchronous_ones(tmp_path):
    config = {"handler": {"resize": 40, "crop": 32},
              "explain": {"target_layer": "layer2", "methods": ["gradcam", "layercam", "layer_ig"], "n_steps": 8,
                          "cache_mb": 0}}
    worker = AsyncWorker(unpack(build_image_mar(tmp_path, "conc", labels=IMAGE_LABELS,
                                                config={**config, "asyncCommunication": True}), tmp_path / "conc"),
                         "image_explainer", "ImageExplainer")
    (tmp_path / "p").mkdir()
    plain = InProcessHandler(unpack(build_image_mar(tmp_path / "p", "plain", labels=IMAGE_LABELS, config=config),
                                    tmp_path / "plain"), "image_explainer", "ImageExplainer")
    requests = [(picture(1), {}), (image_request(2), EXPLAIN), (image_request(3, method="layercam", target="owl"),
                                                                 EXPLAIN),
                (image_request(4, method="layer_ig"), EXPLAIN)]
    try:
        first, _ = worker(requests)
    finally:
        worker.close()
    answers = merged(first)
    assert next(iter(first[0])) == "req-0"  # the prediction before any map
    together = plain(requests)  # the synchronous handler, one batch
    for i, (status, alone) in enumerate(together):
        got = json.loads(answers[f"req-{i}"]["body"])
        assert answers[f"req-{i}"]["status"] == status == 200
        if i == 0:
            assert got == pytest.approx(alone, abs=1e-6)
            continue
        assert got["explanation"]["target"] == alone["explanation"]["target"]
        np.testing.assert_allclose(got["explanation"]["heatmap"]["values"], alone["explanation"]["heatmap"]["values"],
                                   atol=1e-4)
    # nothing left behind on the served model or on the explainers' view of it
    for model in (worker.handler.model, worker.handler.runner.gradcam.model):
        for module in model.modules():
            assert not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)
        assert all(p.grad is None for p in model.parameters())
    assert worker.handler.runner.gradcam.model is not worker.handler.model
    assert all(a is b for a, b in zip(worker.handler.runner.gradcam.model.parameters(), worker.handler.model.parameters()))


def test_async_needs_batch_size_one(tmp_path):
    mar = build_text_mar(tmp_path, "wrong", config={"asyncCommunication": True}, labels=TEXT_LABELS)
    with pytest.raises(ConfigError, match="batchSize: 1"):
        InProcessHandler(unpack(mar, tmp_path / "wrong"), "text_explainer", "TextExplainer")  # batch size 4
