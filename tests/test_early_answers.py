"""Early answers in process: the message the handler sends on TorchServe's worker
socket before the explanation work, decoded as the frontend decodes it."""

import base64
import dataclasses
import json
import socket
import struct

import pytest
from ts.context import RequestProcessor
from ts.protocol.otf_message_handler import create_predict_response

from harness import EXPLAIN, InProcessHandler, build_image_mar, build_text_mar, png, unpack

LABELS = ("negative", "neutral", "positive")


def read_exactly(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "socket closed mid-message"
        data += chunk
    return data


def decode_message(sock) -> tuple[int, dict]:
    """One predict response as TorchServe's frontend reads it (ModelResponseDecoder):
    (code, {request id: {content_type, status, phrase, headers, body}})."""

    def integer():
        return struct.unpack("!i", read_exactly(sock, 4))[0]

    def text():
        return read_exactly(sock, integer()).decode()

    code, _message = integer(), text()
    out = {}
    while True:
        length = integer()
        if length == -1:
            return code, out
        request_id = read_exactly(sock, length).decode()
        entry = {"content_type": text(), "status": integer(), "phrase": text()}
        entry["headers"] = dict((text(), text()) for _ in range(integer()))
        entry["body"] = read_exactly(sock, integer())
        out[request_id] = entry


class WorkerSocket:
    """A handler driven as TorchServe's worker drives it, worker socket included."""

    def __init__(self, handler: InProcessHandler):
        self.handler, self.context = handler.handler, handler.context
        self.worker, self.frontend = socket.socketpair()
        self.context.cl_socket = self.worker

    def __call__(self, requests):
        """Returns (early message or None, final message), as the frontend reads them:
        each {request id: entry}; request ids are ``req-<position in the batch>``."""
        context = self.context
        context.request_processor = [RequestProcessor(dict(headers)) for _, headers in requests]
        context.request_ids = {i: f"req-{i}" for i in range(len(requests))}
        out = self.handler.handle([{"body": body} for body, _ in requests], context)
        assert len(out) == len(requests)
        self.frontend.settimeout(0.2)
        try:
            code, early = decode_message(self.frontend)
            assert code == 200
        except (TimeoutError, socket.timeout):
            early = None
        self.frontend.settimeout(None)
        # what Service.predict sends last: the requests left in request_ids
        self.worker.sendall(create_predict_response(out, context.request_ids, "Prediction success", 200, context))
        code, final = decode_message(self.frontend)
        assert code == 200
        return early, final

    def close(self):
        self.worker.close()
        self.frontend.close()


def body(entry) -> dict:
    return json.loads(entry["body"])


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("early_text")
    mar = build_text_mar(tmp, "tiny", "bert", config={"explain": {"n_steps": 16, "max_n_steps": 64}}, labels=LABELS)
    driver = WorkerSocket(InProcessHandler(unpack(mar, tmp / "unpacked"), "text_explainer", "TextExplainer"))
    yield driver
    driver.close()


def carried_by_explanations(driver, monkeypatch):
    settings = dataclasses.replace(driver.handler.explain_settings, early_answer_carrier="explanation")
    monkeypatch.setattr(driver.handler, "explain_settings", settings)


MIXED = [
    ("the soup was cold".encode(), {}),  # a prediction
    ({"data": "the staff were rude", "n_steps": 8}, EXPLAIN),  # explanations to compute
    ({"data": "a fine evening", "n_steps": 8}, EXPLAIN),
    ({"data": "great view", "n_steps": 999}, EXPLAIN),  # bad: 400 now
    ("lovely dessert".encode(), {}),
]


def test_ready_answers_go_first_and_a_ready_one_carries_the_batch(text):
    text.handler.cache.clear()
    early, final = text(MIXED)
    assert set(early) == {"req-0", "req-3", "req-4"} and set(final) == {"req-1", "req-2", "req-4"}
    for rid in ("req-0", "req-3"):  # whole answers that end the request
        assert "ts_stream_next" not in early[rid]["headers"]
    assert early["req-0"]["status"] == 200 and set(body(early["req-0"])) == set(LABELS)
    assert early["req-3"]["status"] == 400 and body(early["req-3"])["type"] == "bad_n_steps"
    # the last prediction carries the batch: its whole answer now, its stream's end later. Never the
    # error: TorchServe closes the connection after an error status's headers
    carrier = early["req-4"]
    assert carrier["status"] == 200 and carrier["headers"]["ts_stream_next"] == "true"
    assert set(body(carrier)) == set(LABELS)
    assert final["req-4"]["headers"]["ts_stream_next"] == "false" and final["req-4"]["body"] == b""
    for rid in ("req-1", "req-2"):  # ordinary answers, each with its own status
        assert "ts_stream_next" not in final[rid]["headers"]
        assert final[rid]["status"] == 200 and body(final[rid])["explanation"]["method"] == "layer_ig"


def test_an_explanation_may_carry_the_batch_instead(text, monkeypatch):
    carried_by_explanations(text, monkeypatch)
    text.handler.cache.clear()
    early, final = text(MIXED)
    assert set(early) == {"req-0", "req-1", "req-3", "req-4"} and set(final) == {"req-1", "req-2"}
    for rid in ("req-0", "req-3", "req-4"):
        assert "ts_stream_next" not in early[rid]["headers"]
    assert early["req-3"]["status"] == 400 and body(early["req-3"])["type"] == "bad_n_steps"
    carrier = early["req-1"]  # the first explanation: status sent, body to follow
    assert carrier["status"] == 200 and carrier["headers"]["ts_stream_next"] == "true" and carrier["body"] == b""
    assert carrier["content_type"] == "application/json"
    assert final["req-1"]["headers"]["ts_stream_next"] == "false"  # the end of its stream
    assert "ts_stream_next" not in final["req-2"]["headers"]
    for rid in ("req-1", "req-2"):
        assert final[rid]["status"] == 200 and body(final[rid])["explanation"]["method"] == "layer_ig"


def test_answers_equal_the_answers_of_requests_alone(text):
    alone = {}
    requests = [("the soup was cold".encode(), {}), ({"data": "the staff were rude"}, EXPLAIN),
                ("a second prediction".encode(), {})]
    for i, request in enumerate(requests):
        early, final = text([request])
        assert early is None  # nothing to send early in a batch of one
        alone[i] = body(final["req-0"])
    text.handler.cache.clear()  # computed again, not served from the cache
    early, final = text([requests[1], requests[0], requests[2]])
    assert set(early) == {"req-1", "req-2"} and early["req-2"]["headers"]["ts_stream_next"] == "true"
    assert body(early["req-1"]) == pytest.approx(alone[0], abs=1e-6)  # batching moves the last digits only
    assert body(early["req-2"]) == pytest.approx(alone[2], abs=1e-6)
    mixed = body(final["req-0"])
    assert [p["label"] for p in mixed["predictions"]] == [p["label"] for p in alone[1]["predictions"]]
    assert mixed["explanation"]["target"] == alone[1]["explanation"]["target"]
    for got, want in zip(mixed["explanation"]["tokens"], alone[1]["explanation"]["tokens"]):
        assert got["token"] == want["token"] and got["attribution"] == pytest.approx(want["attribution"], abs=1e-5)
    text.handler.cache.clear()
    early, final = text([requests[1], requests[0]])  # one ready answer: it would only carry, nothing to gain
    assert early is None


def test_an_error_never_carries_the_batch(text):
    text.handler.cache.clear()
    early, final = text([({"data": "the staff were rude"}, EXPLAIN), ({"data": "x", "n_steps": 999}, EXPLAIN),
                         ({"data": "y", "target": "nope"}, EXPLAIN)])  # two ready answers, both errors
    assert early is None and set(final) == {"req-0", "req-1", "req-2"}


def test_nothing_is_sent_early_without_explanation_work(text):
    cases = [
        [("one".encode(), {}), ("two".encode(), {})],  # predictions only
        [({"data": "only explanations"}, EXPLAIN), ({"data": "here"}, EXPLAIN)],
    ]
    for requests in cases:
        early, final = text(requests)
        assert early is None and set(final) == {f"req-{i}" for i in range(len(requests))}
        assert all("ts_stream_next" not in entry["headers"] for entry in final.values())
    text([({"data": "a cached text"}, EXPLAIN)])
    early, final = text([({"data": "a cached text"}, EXPLAIN), ("a prediction".encode(), {})])
    assert early is None and body(final["req-0"])["explanation"]["cached"] is True  # a hit: nothing to wait for


def test_a_carrier_that_fails_later_has_its_error_in_the_body(text, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    carried_by_explanations(text, monkeypatch)
    monkeypatch.setattr(text.handler, "_explanation", broken)  # fails after the early answers, outside any guard
    early, final = text([({"data": "a first text to fail"}, EXPLAIN), ("fine".encode(), {}),
                         ({"data": "a second text to fail"}, EXPLAIN)])
    assert early["req-1"]["status"] == 200 and early["req-0"]["status"] == 200  # the carrier's status is sent
    for rid in ("req-0", "req-2"):
        assert body(final[rid]) == {"code": 503, "type": "explanation_failed",
                                    "message": "the explanation failed on the server"}
    assert final["req-2"]["status"] == 503  # not the carrier: its own status


def test_off_by_setting(tmp_path, monkeypatch):
    mar = build_text_mar(tmp_path, "quiet", "bert", config={"explain": {"early_answers": False}}, labels=LABELS)
    driver = WorkerSocket(InProcessHandler(unpack(mar, tmp_path / "unpacked"), "text_explainer", "TextExplainer"))
    try:
        early, final = driver([({"data": "the staff were rude"}, EXPLAIN), ("fine".encode(), {}), ("good".encode(), {})])
        assert early is None and set(final) == {"req-0", "req-1", "req-2"}
    finally:
        driver.close()


def test_image_integrated_gradients_wait_but_cam_maps_and_predictions_do_not(tmp_path):
    from PIL import Image

    mar = build_image_mar(tmp_path, "img", config={"explain": {"methods": ["gradcam", "layer_ig"]}})
    driver = WorkerSocket(InProcessHandler(unpack(mar, tmp_path / "unpacked"), "image_explainer", "ImageExplainer"))
    image = png(Image.new("RGB", (64, 64), (200, 30, 30)))
    encoded = base64.b64encode(image).decode()
    try:
        early, final = driver([(image, {}), ({"data": encoded, "method": "layer_ig", "n_steps": 4}, EXPLAIN),
                               ({"data": encoded, "method": "gradcam"}, EXPLAIN)])
        assert set(early) == {"req-0", "req-2"} and set(final) == {"req-1", "req-2"}
        assert "ts_stream_next" not in early["req-0"]["headers"]
        assert early["req-2"]["headers"]["ts_stream_next"] == "true"  # the Grad-CAM answer carries the batch
        assert body(early["req-2"])["explanation"]["method"] == "gradcam"
        assert body(final["req-1"])["explanation"]["method"] == "layer_ig"
    finally:
        driver.close()


def test_kserve_requests_are_answered_whole(text):
    """A KServe v1 predict request (its instances) is answered early as one response;
    a KServe explain request waits like any explanation."""
    kserve_predict = json.dumps({"instances": ["good soup", "cold soup"]}).encode()
    kserve_explain = json.dumps({"instances": ["a kserve text to explain"]}).encode()
    early, final = text([(kserve_predict, {}), (kserve_explain, {"explain": "True"}),
                         ({"data": "plain text to explain"}, {"explain": "True", "url_path": "explanations/tiny"}),
                         ("a plain prediction".encode(), {})])
    assert set(early) == {"req-0", "req-3"} and set(final) == {"req-1", "req-2", "req-3"}
    assert "ts_stream_next" not in early["req-0"]["headers"]
    predictions = body(early["req-0"])["predictions"]
    assert len(predictions) == 2 and all(set(p) == set(LABELS) for p in predictions)
    explained = body(final["req-1"])
    assert explained["explanations"][0]["explanation"]["method"] == "layer_ig"


def test_off_under_a_service_envelope_that_rewrites_answers(text, monkeypatch):
    monkeypatch.setattr(text.handler, "foreign_envelope", True)  # what adopt_envelope marks
    early, final = text([({"data": "an enveloped text"}, EXPLAIN), ("fine".encode(), {}), ("good".encode(), {})])
    assert early is None and set(final) == {"req-0", "req-1", "req-2"}
