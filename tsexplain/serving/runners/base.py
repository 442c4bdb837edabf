"""The contract between the batch flow and a runner, and the item they pass along."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Hashable, Optional

import torch

from ..deadline import Deadline
from ..errors import RequestError
from ..schema import Request


@dataclass(eq=False)
class Item:
    """One request (or KServe instance) that parsed: what the runner works on.

    The flow fills in everything but ``inputs``, ``result`` and ``explained_class`` of
    fused explanations, which are the runner's.
    """

    unit: Any  # the flow's Unit this item answers
    request: Request
    options: dict  # every field's effective value (schema.effective): method, n_steps, ...
    target: Optional[int]  # the class the request named (None: the predicted class)
    contrast: Optional[int]  # the class to explain against (None: none)
    inputs: Any = None  # the runner's prepared input
    explain: bool = False  # an explanation is computed or looked up for it
    skipped: Optional[str] = None  # why an asked-for explanation was denied (on_denied: predict)
    deadline: Optional[Deadline] = None  # when its explanation work must stop
    cache_key: Optional[str] = None
    cached: Optional[dict] = None  # its explanation, from the cache
    predicted: Optional[int] = None  # the class this batch's forward predicts for it
    explained_class: Optional[int] = None  # target, or the predicted class
    result: Any = None  # the runner's explanation, before rendering
    elapsed_ms: float = 0.0  # the explanation work's time
    error: Optional[RequestError] = None  # its explanation failed with this
    ranked: list = field(default_factory=list)  # (index, label, probability), most probable first
    caller: Optional[str] = None  # the name of the explain token it presented (the gate's decision)
    priorities: tuple = ()  # the priority values it carried (header, then JSON field)
    explanation: Optional[dict] = None  # its explanation as answered, once rendered or taken from the cache
    record_extras: Optional[dict] = None  # what its audit record keeps beyond the answer (Runner.record_extras)

    @property
    def method(self) -> str:
        return self.options["method"]


class Runner:
    """What a kind of model adds to the flow. Subclasses set the attributes and
    implement the methods; see :mod:`.image` and :mod:`.text`.

    Attributes:
        modality: ``"image"`` or ``"text"``: the request fields it takes (schema).
        labels: class labels, in index order.
        fused_methods: methods whose explanation comes out of the prediction forward
            (:meth:`forward` computes them when asked).
        explanation_fields: the request fields that change the explanation part of an
            answer (they are part of its cache key).
        log_fields: the explanation's fields that its log line shows (no values, no payloads).
        unsupported_methods: methods this model cannot run, each with the reason its
            requests are told (422 ``method_unsupported``).
    """

    modality: str
    labels: list[str]
    fused_methods: frozenset = frozenset()
    explanation_fields: tuple = ()
    log_fields: tuple = ()
    unsupported_methods: dict = {}

    def prepare(self, item: Item) -> None:
        """Set ``item.inputs`` from ``item.request.data``; RequestError for bad input."""
        raise NotImplementedError

    def cache_input(self, item: Item) -> bytes:
        """The bytes the input is keyed on in the explanation cache."""
        raise NotImplementedError

    def forward(self, items: list[Item], fused: list[Item]) -> torch.Tensor:
        """``[len(items), classes]`` probabilities (CPU, float) of every item, in one pass.

        ``fused``: items (among ``items``) whose ``fused_methods`` explanation comes out
        of the same pass; for each, set ``result``, ``explained_class`` (its target, or
        the class predicted) and ``elapsed_ms``. Raises only when the pass failed.
        """
        raise NotImplementedError

    def group_key(self, item: Item) -> Hashable:
        """Items with the same key are explained in one :meth:`explain` call."""
        raise NotImplementedError

    def explain(self, items: list[Item]) -> list:
        """The explanations of ``items`` (one group), of class ``item.explained_class``
        (minus ``item.contrast``): one result per item, in order. Raises when the group
        fails; an attribution input error fails the group, which the flow then
        retries item by item."""
        raise NotImplementedError

    def render(self, item: Item) -> dict:
        """The JSON ``explanation`` of ``item.result`` (whose class is ``item.explained_class``)."""
        raise NotImplementedError

    def prediction_top_k(self, item: Item) -> int:
        """How many classes ``item``'s predictions list."""
        raise NotImplementedError

    # -- what the audit trail records (tsexplain/serving/recording.py) --

    def record_parameters(self, item: Item, explanation: dict) -> dict:
        """The effective parameters of ``item``'s ``explanation`` (as answered): what an
        audit needs to know how it was computed, and for images to draw it again."""
        raise NotImplementedError

    def record_extras(self, item: Item, explanation: dict) -> Optional[dict]:
        """Explanation fields the record keeps that the answer left out (images: the
        heatmap values when only the overlay was asked for), right after :meth:`render`;
        ``None``: nothing beyond the answer."""
        return None

    def input_content_type(self, item: Item) -> str:
        """The media type of ``item``'s input (the bytes :meth:`cache_input` gives)."""
        raise NotImplementedError
