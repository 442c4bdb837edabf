"""What a request is answered: statuses with JSON bodies, predictions, the explanation envelope."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from .errors import RequestError

JSON_CONTENT_TYPE = "application/json"


@dataclass(frozen=True)
class Answer:
    """What a row or a unit is answered: a status, its reason phrase and a compact JSON body."""

    status: int
    body: str
    phrase: str = ""

    @classmethod
    def of(cls, body: Any, status: int = 200) -> "Answer":
        return cls(status, json.dumps(body, separators=(",", ":"), ensure_ascii=False), "OK" if status == 200 else "")

    @classmethod
    def error(cls, error: RequestError) -> "Answer":
        return cls(error.status, json.dumps(error.to_json(), separators=(",", ":")), error.kind)


def ranked_rows(probabilities, labels: list[str], top_ks: list[int]) -> list[list[tuple[int, str, float]]]:
    """(index, label, probability) of the ``top_ks[r]`` most probable classes of each row ``r`` of
    ``probabilities`` (``[N, classes]``), most probable first: one ``topk`` and one ``tolist``
    per distinct count, not per row (the same answers as ``probabilities[r].topk`` row by row)."""
    out: list = [None] * len(top_ks)
    for top_k in dict.fromkeys(top_ks):
        rows = [r for r, k in enumerate(top_ks) if k == top_k]
        subset = probabilities if len(rows) == len(top_ks) else probabilities[rows]
        values, indices = subset.topk(min(top_k, len(labels)), dim=1)
        for r, row_indices, row_values in zip(rows, indices.tolist(), values.tolist()):
            out[r] = [(i, labels[i], p) for i, p in zip(row_indices, row_values)]
    return out


def envelope(ranked, explanation: Optional[dict], skipped: Optional[str] = None) -> dict:
    """The body of an explanation-route answer."""
    body = {"predictions": [{"index": i, "label": label, "probability": p} for i, label, p in ranked],
            "explanation": explanation}
    if skipped is not None:
        body["explanation_skipped"] = skipped
    return body
