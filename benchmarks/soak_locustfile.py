"""Locust traffic for the soak test (run by ``python -m benchmarks.soak``, not by hand).

Mixed traffic on loopback: predictions and explanations of an image and a text
model, explanations that the gate denies, bad requests, and explanations of a
model whose explanations fail on purpose (``explain.inject_fault``). Each user
goes round ``CYCLE`` (the mix, by weight) from its own starting point, so even a
short run sends every kind. Every request has an expected status; each answer is counted by (kind, status) and
marked a failure in locust's own statistics when it is not the expected one.

Configured by environment variables that the runner sets: SOAK_INFERENCE_KEY,
SOAK_EXPLAIN_TOKEN, SOAK_PAYLOADS (folder with image.png and review.txt),
SOAK_COUNTS (where the counts are written as JSON when locust stops).
"""
import base64
import itertools
import json
import os
import random
from collections import Counter
from pathlib import Path

from locust import HttpUser, between, events, task

PAYLOADS = Path(os.environ.get("SOAK_PAYLOADS", "."))
INFERENCE_KEY = os.environ.get("SOAK_INFERENCE_KEY", "")
EXPLAIN_TOKEN = os.environ.get("SOAK_EXPLAIN_TOKEN", "")
COUNTS: Counter = Counter()  # (kind, expected status, status) -> answers
CYCLE = ["image_prediction", "text_prediction", "image_explanation", "bad_image", "text_explanation",
         "image_prediction", "faulty_prediction", "text_prediction", "text_explanation_denied", "image_explanation",
         "bad_json", "image_prediction", "text_explanation", "faulty_explanation", "text_prediction", "unknown_target"]
STARTS = itertools.count()


def _read(name: str, binary: bool = True):
    path = PAYLOADS / name
    return path.read_bytes() if binary else path.read_text()


class Client(HttpUser):
    """One client: goes round ``CYCLE``, waiting 0.1 to 0.5 s between requests."""

    wait_time = between(0.1, 0.5)

    def on_start(self):
        self.position = next(STARTS) * 5  # users start at different points of the cycle
        self.auth = {"Authorization": f"Bearer {INFERENCE_KEY}"}
        self.image = _read("image.png")
        self.image_json = json.dumps({"data": base64.b64encode(self.image).decode(), "outputs": ["heatmap"]})
        self.review = _read("review.txt", binary=False)
        self.rng = random.Random()

    @task
    def next_request(self):
        kind = CYCLE[self.position % len(CYCLE)]
        self.position += 1
        getattr(self, kind)()

    def _post(self, kind: str, path: str, body, expected: int, content_type: str, **headers):
        all_headers = {**self.auth, "Content-Type": content_type, **headers}
        with self.client.post(path, data=body, headers=all_headers, name=kind, catch_response=True) as response:
            status = response.status_code
            COUNTS[(kind, expected, status)] += 1
            if status == expected:
                response.success()
            else:
                response.failure(f"expected {expected}, got {status}")

    def image_prediction(self):
        self._post("image_prediction", "/predictions/shapes", self.image, 200, "application/octet-stream")

    def image_explanation(self):
        self._post("image_explanation", "/explanations/shapes", self.image_json, 200, "application/json")

    def text_prediction(self):
        self._post("text_prediction", "/predictions/reviews", self.review.encode(), 200, "text/plain")

    def text_explanation(self):
        """Priority and the right token: the gate lets it through."""
        self._post("text_explanation", "/explanations/reviews", self.review.encode(), 200, "text/plain",
                   **{"X-Priority": "high", "X-Explain-Token": EXPLAIN_TOKEN})

    def text_explanation_denied(self):
        """Priority but a wrong token: 403."""
        self._post("text_explanation_denied", "/explanations/reviews", self.review.encode(), 403, "text/plain",
                   **{"X-Priority": "high", "X-Explain-Token": "not-the-token"})

    def bad_image(self):
        junk = bytes(self.rng.getrandbits(8) for _ in range(self.rng.randint(1, 4096)))
        self._post("bad_image", "/explanations/shapes", junk, 400, "application/octet-stream")

    def bad_json(self):
        self._post("bad_json", "/explanations/shapes", b'{"data": "iVBOR', 400, "application/json")

    def unknown_target(self):
        body = json.dumps({"data": self.review, "target": "lukewarm"})
        self._post("unknown_target", "/explanations/reviews", body, 400, "application/json",
                   **{"X-Priority": "high", "X-Explain-Token": EXPLAIN_TOKEN})

    def faulty_explanation(self):
        self._post("faulty_explanation", "/explanations/faulty", self.image, 503, "application/octet-stream")

    def faulty_prediction(self):
        self._post("faulty_prediction", "/predictions/faulty", self.image, 200, "application/octet-stream")


@events.quitting.add_listener
def write_counts(environment, **_):
    path = os.environ.get("SOAK_COUNTS")
    if path:
        rows = [{"kind": kind, "expected": expected, "status": status, "count": n}
                for (kind, expected, status), n in sorted(COUNTS.items())]
        Path(path).write_text(json.dumps(rows, indent=1))
