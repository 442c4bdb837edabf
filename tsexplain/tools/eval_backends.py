"""Where the evaluation gets its explanations and probabilities.

Every backend offers the same calls, so :mod:`tsexplain.tools.evaluation` and
:mod:`tsexplain.tools.sanity` run unchanged on all of them:

- ``explain(inputs, method, targets=None)`` -> one :class:`Explained` per input (the
  predicted class is explained unless ``targets`` names the classes);
- ``predict_proba(batch)`` -> ``[B, K]`` probabilities in class-index order;
- ``model``: the ``torch.nn.Module`` whose weights the sanity check randomises (``None``
  for a server), and ``run_forward(input)`` to run it once on an input;
- for images, ``preprocessing``: the model's resize and crop (see :mod:`.eval_data`).

Backends: a model folder in process (:class:`InProcessImage`, :class:`InProcessText`),
a MAR's handler in process (:mod:`.eval_mar`), or a model on TorchServe
(:class:`ServedImage`, :class:`ServedText`). The last two send the same requests, which
:class:`ImageRequests` and :class:`TextRequests` write; only the transport differs.
Image inputs are uint8 ``[H, W, 3]`` arrays (the model's view, :mod:`.eval_data`), sent
as PNG (lossless); text inputs are strings.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..attr import names
from ..serving.images import Preprocessing


class EvaluationError(RuntimeError):
    """The backend could not answer (unknown method, server error, bad model folder)."""


@dataclass
class Explained:
    """One explanation: the class explained and either an image map or text words."""

    target: int
    method: str
    heatmap: Optional[np.ndarray] = None  # [h, w], higher = more important
    words: list = field(default_factory=list)  # [{"word", "start", "end", "attribution"}]


# ------------------------------------------------------------------------ in process

def _gradcam(model, layer_name):
    from ..attr.cam import GradCAM
    from ..attr.layers import get_layer

    cam = GradCAM(model, get_layer(model, layer_name))

    def explain(batch: torch.Tensor, targets: Optional[list[int]]):
        out = cam.attribute(batch, targets)
        return out.heatmaps, out.targets

    return explain


#: In-process image methods: name -> factory(model, target layer name) -> explain(batch, targets
#: or None) -> (``[N, h, w]`` maps, targets). New core methods register here.
IMAGE_METHODS: dict[str, Callable] = {"gradcam": _gradcam}


def _text_method(name: str) -> Callable:
    """Factory for the core text method ``name`` (:mod:`tsexplain.attr.text`), default settings."""

    def factory(model, tokenizer):
        from ..attr.text import make_text_explainer

        explainer = make_text_explainer(name, model, tokenizer)

        def explain(texts: list[str], targets: list[int]):
            return [[{"word": w.word, "start": w.start, "end": w.end, "attribution": w.attribution} for w in r.words]
                    for r in explainer.explain(texts, targets, top_k=0)]

        return explain

    return factory


#: In-process text methods: name -> factory(model, tokenizer) -> explain(texts, targets) ->
#: one list of word dicts per text. New core methods register here.
TEXT_METHODS: dict[str, Callable] = {name: _text_method(name) for name in names.TEXT_METHODS}


def _unknown(method, known):
    return EvaluationError(f"unknown method {method!r} in process; available: {sorted(known)}")


class InProcessImage:
    """A torchvision classifier from a folder holding ``training.json`` (``architecture``,
    ``num_classes``, ``image_size``, ``target_layer``), ``weights.pt`` and
    ``index_to_name.json``, as ``build/demo/shapes`` does. Preprocessing: resize and crop to
    ``image_size``, ImageNet normalisation (what the demo MAR serves)."""

    kind = "in-process"

    def __init__(self, model_dir: str | os.PathLike, batch_size: int = 64):
        from ..serving.models import build_torchvision_classifier

        folder = Path(model_dir)
        try:
            info = json.loads((folder / "training.json").read_text())
            self.model = build_torchvision_classifier(info["architecture"], info["num_classes"],
                                                      str(folder / "weights.pt")).eval()
        except (OSError, KeyError, ValueError) as exc:
            raise EvaluationError(f"{folder}: not an image model folder ({type(exc).__name__}: {exc})") from None
        self.image_size = int(info["image_size"])
        self.layer = info.get("target_layer")
        names = json.loads((folder / "index_to_name.json").read_text()) if (folder / "index_to_name.json").exists() else {}
        self.labels = [names.get(str(i), str(i)) for i in range(info["num_classes"])]
        self.preprocessing = Preprocessing(self.image_size, self.image_size)
        self.batch_size = batch_size
        self.description = f"in process: {folder}"

    def _tensor(self, images) -> torch.Tensor:
        return torch.stack([self.preprocessing(Image.fromarray(np.asarray(i))) for i in images])

    def predict_proba(self, images) -> np.ndarray:
        with torch.inference_mode():
            return torch.softmax(self.model(self._tensor(images)).float(), dim=1).numpy()

    def run_forward(self, image) -> None:
        self.model(self._tensor([image]))

    def explain(self, images: Sequence[np.ndarray], method: Optional[str],
                targets: Optional[Sequence[int]] = None) -> list[Explained]:
        method = method or "gradcam"
        if method not in IMAGE_METHODS:
            raise _unknown(method, IMAGE_METHODS)
        if self.layer is None:
            from ..attr.layers import find_target_layer
            self.layer = find_target_layer(self.model, self._tensor(images[:1]))
        explain = IMAGE_METHODS[method](self.model, self.layer)
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            heatmaps, chosen = explain(self._tensor(images[chunk]), None if targets is None else list(targets[chunk]))
            out += [Explained(int(t), method, heatmap=h.detach().cpu().numpy()) for h, t in zip(heatmaps, chosen)]
        return out


class InProcessText:
    """A Hugging Face sequence classifier saved with ``save_pretrained`` (model + fast tokenizer)."""

    kind = "in-process"

    def __init__(self, model_dir: str | os.PathLike, batch_size: int = 64):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise EvaluationError(f"{model_dir}: not a Hugging Face model folder ({exc})") from None
        id2label = self.model.config.id2label
        self.labels = [id2label[i] for i in range(self.model.config.num_labels)]
        self.batch_size = batch_size
        self.description = f"in process: {model_dir}"

    def predict_proba(self, texts) -> np.ndarray:
        with torch.inference_mode():
            enc = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
            return torch.softmax(self.model(**enc).logits.float(), dim=1).numpy()

    def run_forward(self, text: str) -> None:
        self.model(**self.tokenizer([text], truncation=True, return_tensors="pt"))

    def explain(self, texts: Sequence[str], method: Optional[str],
                targets: Optional[Sequence[int]] = None) -> list[Explained]:
        method = method or "layer_ig"
        if method not in TEXT_METHODS:
            raise _unknown(method, TEXT_METHODS)
        explain = TEXT_METHODS[method](self.model, self.tokenizer)
        out = []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start:start + self.batch_size])
            chosen = (self.predict_proba(chunk).argmax(axis=1).tolist() if targets is None
                      else [int(t) for t in targets[start:start + self.batch_size]])
            out += [Explained(t, method, words=w) for t, w in zip(chosen, explain(chunk, chosen))]
        return out


# ------------------------------------------------------- through the handler's HTTP API

def read_inference_key(key: Optional[str], key_file: Optional[str]) -> Optional[str]:
    """The inference key: given, from ``key_file`` (TorchServe's key_file.json), else from
    ``./key_file.json`` when there is one, else none (token authorization off)."""
    if key:
        return key
    path = Path(key_file) if key_file else Path("key_file.json")
    if not path.exists():
        if key_file:
            raise EvaluationError(f"{path}: no such key file")
        return None
    try:
        return json.loads(path.read_text())["inference"]["key"]
    except (ValueError, KeyError, TypeError) as exc:
        raise EvaluationError(f"{path}: not a TorchServe key file ({type(exc).__name__})") from None


#: One request: (body bytes, content type), as a client sends it.
Payload = tuple[bytes, str]


def json_payload(body: dict) -> Payload:
    return json.dumps(body).encode(), "application/json"


class HandlerRequests:
    """The handler's API (``/predictions``, ``/explanations``) as the evaluation uses it.

    A transport implements ``_answers(route, payloads)``: the decoded JSON answer of
    each request, raising :class:`EvaluationError` for any non-200 answer.
    """

    model = None  # no weights to randomise unless the transport holds the model
    labels: list

    def _answers(self, route: str, payloads: Sequence[Payload]) -> list[Any]:
        raise NotImplementedError

    def _explanations(self, inputs: Sequence, payload: Callable[[Any], dict], method: Optional[str],
                      targets: Optional[Sequence[int]], required: str) -> list[dict]:
        """The ``explanation`` of each input's /explanations answer (``payload(input)`` is its body),
        checked to hold ``required``; the predictions in the answers teach the labels."""
        bodies = []
        for k, item in enumerate(inputs):
            body = payload(item)
            if method:
                body["method"] = method
            if targets is not None:
                body["target"] = int(targets[k])
            bodies.append(json_payload(body))
        out = []
        for answer in self._answers("explanations", bodies):
            explanation = answer.get("explanation")
            if not explanation or required not in explanation:
                raise EvaluationError(f"no explanation in the answer: {answer.get('explanation_skipped', answer)!r}")
            self._learn_labels(answer["predictions"])
            out.append(explanation)
        return out

    def _know_labels(self, first_input) -> None:
        """Learn the class labels (from one explanation's predictions) before reading probabilities."""
        if not self.labels:
            self.explain([first_input], None)

    def _learn_labels(self, predictions: list[dict]) -> None:
        for p in predictions:
            index = int(p["index"])
            while len(self.labels) <= index:
                self.labels.append(None)
            self.labels[index] = p["label"]

    def _probabilities(self, answers: list[dict]) -> np.ndarray:
        """``{label: p}`` answers as ``[B, K]`` rows; classes a server left out (its ``top_k``) share
        the remaining mass equally, which is exact when one is missing and an upper bound otherwise."""
        index = {label: i for i, label in enumerate(self.labels)}
        out = np.zeros((len(answers), len(self.labels)))
        for row, answer in zip(out, answers):
            for label, p in answer.items():
                if label not in index:
                    raise EvaluationError(f"the server answered an unknown label {label!r}")
                row[index[label]] = p
            missing = [i for i, label in enumerate(self.labels) if label not in answer]
            if missing:
                row[missing] = max(0.0, 1.0 - row.sum()) / len(missing)
        return out


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _png_base64(image: np.ndarray) -> str:
    return base64.b64encode(png_bytes(image)).decode("ascii")


class ImageRequests(HandlerRequests):
    """An ``ImageExplainer`` model's requests. Predictions ask for every class (``top_k``)."""

    preprocessing: Optional[Preprocessing] = None

    def explain(self, images: Sequence[np.ndarray], method: Optional[str],
                targets: Optional[Sequence[int]] = None, **fields) -> list[Explained]:
        payload = lambda image: {"data": _png_base64(image), "outputs": ["heatmap"], "top_k": 1000, **fields}  # noqa: E731
        return [Explained(int(e["target"]["index"]), e.get("method", method),
                          heatmap=np.asarray(e["heatmap"]["values"], dtype=np.float32))
                for e in self._explanations(images, payload, method, targets, "heatmap")]

    def predict_proba(self, images) -> np.ndarray:
        self._know_labels(images[0])
        answers = self._answers("predictions", [json_payload({"data": _png_base64(i), "top_k": 1000}) for i in images])
        return self._probabilities(answers)


class TextRequests(HandlerRequests):
    """A ``TextExplainer`` model's requests."""

    def explain(self, texts: Sequence[str], method: Optional[str],
                targets: Optional[Sequence[int]] = None) -> list[Explained]:
        out = []
        for e in self._explanations(texts, lambda text: {"data": text}, method, targets, "words"):
            words = [{k: w[k] for k in ("word", "start", "end", "attribution")} for w in e["words"]]
            out.append(Explained(int(e["target"]["index"]), e.get("method", method), words=words))
        return out

    def predict_proba(self, texts) -> np.ndarray:
        self._know_labels(texts[0])
        answers = self._answers("predictions", [(t.encode("utf-8"), "text/plain; charset=utf-8") for t in texts])
        return self._probabilities(answers)


class Served(HandlerRequests):
    """Explanations and predictions of ``model`` on a running TorchServe.

    Maps come from ``POST /explanations/{model}`` and probabilities of the perturbed inputs
    from ``POST /predictions/{model}``, ``concurrency`` requests in flight at a time so that
    TorchServe forms its batches (``batchSize`` of the model).
    """

    kind = "served"

    def __init__(self, url: str, model: str, key: Optional[str] = None, explain_token: Optional[str] = None,
                 priority: Optional[str] = None, priority_header: str = "X-Priority", concurrency: int = 8,
                 timeout: float = 120, preprocessing: Optional[Preprocessing] = None):
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EvaluationError(f"bad server URL {url!r}")
        self.parts, self.model_name, self.timeout = parts, model, timeout
        self.headers = {}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        if explain_token:
            self.headers["X-Explain-Token"] = explain_token
        if priority:
            self.headers[priority_header] = priority
        self.pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
        self.labels: list[str] = []
        self.preprocessing = preprocessing
        self.description = f"served: {parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}, model {model}"

    def _post(self, route: str, payload: Payload) -> Any:
        connection_class = http.client.HTTPSConnection if self.parts.scheme == "https" else http.client.HTTPConnection
        connection = connection_class(self.parts.hostname, self.parts.port, timeout=self.timeout)
        path = f"{self.parts.path.rstrip('/')}/{route}/{urllib.parse.quote(self.model_name)}"
        body, content_type = payload
        try:
            connection.request("POST", path, body=body, headers={**self.headers, "Content-Type": content_type})
            response = connection.getresponse()
            status, data = response.status, response.read()
        except OSError as exc:
            raise EvaluationError(f"POST {path}: {type(exc).__name__}: {exc}") from None
        finally:
            connection.close()
        if status != 200:
            raise EvaluationError(f"POST {path} answered {status}: {data[:300].decode('utf-8', 'replace')}")
        return json.loads(data)

    def _answers(self, route: str, payloads: Sequence[Payload]) -> list[Any]:
        return list(self.pool.map(lambda payload: self._post(route, payload), payloads))


class ServedImage(ImageRequests, Served):
    """An ``ImageExplainer`` model on TorchServe."""


class ServedText(TextRequests, Served):
    """A ``TextExplainer`` model on TorchServe."""
