"""TorchServe glue shared by the explainer handlers: the per-request flow.

Every request of a batch is parsed, checked against the explanation policy and
answered on its own (status, content type, body); a bad request gets its 4xx
while the others go on. Model work is done once for the whole batch by the
handler's ``_answer_batch``.
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.protocol.otf_message_handler import create_predict_response

from tsexplain import kserve
from tsexplain.deadline import Deadline, DeadlineExceeded, enforce
from tsexplain.cache import PREDICTED, ExplanationCache, cache_key, fingerprint_files, model_version
from tsexplain.concurrency import MicroBatcher, Overloaded, shared_weights_copy
from tsexplain.errors import ConfigError, RequestError
from tsexplain.parsing import request_body
from tsexplain.policy import EXPLANATIONS_ROUTE_MARKER, ExplanationGate, load_secret, lower_case_headers

logger = logging.getLogger(__name__)
JSON_CONTENT_TYPE = "application/json"


@dataclass
class Prepared:
    """One valid request of a batch, ready for the shared forward pass."""

    idx: int  # position in the batch
    request: Any  # the parsed request
    explain: bool  # an explanation will be computed
    target: Optional[int]  # class index, None for the predicted class
    inputs: Any  # this request's model input (images: the cropped image until the batch tensor is made)
    original: Any = None  # what the input was made from (the decoded image)
    skipped: Optional[str] = None  # why an asked-for explanation was denied (on_denied: predict)
    deadline: Optional[Deadline] = None  # when this request's explanation work must stop
    method: Optional[str] = None  # the explanation method of this request (None: the model's default)
    contrast: Optional[int] = None  # class index to explain against (None: no contrast)


def is_explain_request(context, idx: int) -> bool:
    """True when request ``idx`` came through an explanation route."""
    return context.get_request_header(idx, "explain") == "True"


def answer(context, idx: int, body: Any, status: int = 200) -> str:
    """Compact JSON body for request ``idx``, with its status and content type."""
    context.set_response_status(status, "OK" if status == 200 else "", idx)
    context.set_response_content_type(idx, JSON_CONTENT_TYPE)
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def answer_error(context, idx: int, error: RequestError) -> str:
    context.set_response_status(error.status, error.kind, idx)
    context.set_response_content_type(idx, JSON_CONTENT_TYPE)
    return json.dumps(error.to_json(), separators=(",", ":"))


def explanation_failed(exc: BaseException) -> RequestError:
    """The error a request gets when its explanation raised (not its own fault)."""
    out_of_memory = "out of memory" in str(exc).lower() or isinstance(exc, MemoryError)
    if out_of_memory:
        return RequestError("the explanation ran out of memory; the prediction was not affected", "out_of_memory", 507)
    return RequestError("the explanation failed on the server", "explanation_failed", 503)


def deadline_error(deadline: Deadline) -> RequestError:
    """The error a request gets when its explanation went past its deadline."""
    return RequestError(f"the explanation did not finish within its deadline of {deadline.limit_ms:g} ms "
                        "(explain.deadline_ms, or the request's deadline_ms)", "deadline_exceeded", 504)


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


class UnitResponses:
    """Stands in for the TorchServe context while the handler answers the units of
    a batch (plain requests and KServe instances): statuses are recorded per unit,
    everything else goes to the real context."""

    def __init__(self, context):
        self._context = context
        self.statuses: dict[int, tuple[int, str]] = {}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)

    def set_response_content_type(self, idx: int, value: str) -> None:
        pass  # every answer is JSON

    def status(self, idx: int) -> int:
        return self.statuses.get(idx, (200, ""))[0]

    def __getattr__(self, name):
        return getattr(self._context, name)


KSERVE_ENVELOPES = ("KServeEnvelope", "KServev2Envelope")


def loader_frames():
    """The frames above the caller's caller, innermost first: during ``initialize``, they
    reach TorchServe 0.12's ``TsModelLoader.load``, which holds the envelope and the Service."""
    frame = sys._getframe(2)
    while frame is not None:
        yield frame
        frame = frame.f_back


def adopt_envelope(handler) -> None:
    """Make TorchServe's stock KServe envelope (``service_envelope=kserve`` or
    ``kservev2`` in config.properties) pass requests through unchanged.

    The stock envelopes read the first request of a batch only and wrap the
    handler's answers into one response; the handler reads KServe bodies itself,
    request by request and instance by instance (``tsexplain.kserve``). TorchServe
    0.12 builds the envelope around ``handler.handle`` in ``TsModelLoader.load``
    before it calls ``initialize``; the envelope is found there, on the stack.
    """
    for frame in loader_frames():
        envelope_instance = frame.f_locals.get("envelope_instance")
        wrapped = getattr(getattr(envelope_instance, "_handle_fn", None), "__self__", None)
        if wrapped is handler:
            name = type(envelope_instance).__name__
            if name in KSERVE_ENVELOPES:
                envelope_instance.parse_input = lambda rows: rows
                envelope_instance.format_output = lambda answers: answers
                logger.info("service envelope %s: requests pass through; the handler reads KServe v1/v2 bodies", name)
            else:
                handler.foreign_envelope = True  # it rewrites answers: none may bypass it (early answers)
                logger.warning("service envelope %s wraps the handler; its format is not the handler's", name)
            return


class SerializedSocket:
    """TorchServe's worker socket with one writer at a time. With ``asyncCommunication``
    TorchServe's sender thread and the handler's batch threads both write whole
    messages to it; unserialized, their bytes could interleave."""

    def __init__(self, sock):
        self._socket = sock
        self._lock = threading.Lock()

    def sendall(self, data) -> None:
        with self._lock:
            self._socket.sendall(data)

    def __getattr__(self, name):
        return getattr(self._socket, name)


def serialize_worker_socket(context) -> bool:
    """Make TorchServe's ``Service`` (the one whose context is ``context``) keep its worker
    socket as a :class:`SerializedSocket`. TorchServe 0.12 builds the Service in
    ``TsModelLoader.load`` and calls ``initialize`` from there; the Service is found on
    the stack and sets its socket after loading. Returns False when not found."""
    from ts.service import Service

    for frame in loader_frames():
        for value in list(frame.f_locals.values()):
            if isinstance(value, Service) and value.context is context:
                plain = type(value).set_cl_socket
                value.set_cl_socket = lambda sock, service=value: plain(
                    service, sock if isinstance(sock, SerializedSocket) else SerializedSocket(sock))
                return True
    return False


class _PerThread:
    """A handler attribute with one value per thread: with ``asyncCommunication`` two
    batches run at once (one predicting, one explaining), each with its own state."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, handler, owner=None):
        if handler is None:
            return self
        return getattr(handler.__dict__.setdefault("_per_thread", threading.local()), self.name, None)

    def __set__(self, handler, value):
        setattr(handler.__dict__.setdefault("_per_thread", threading.local()), self.name, value)


@dataclass
class _Batch:
    """What ``handle`` knows of the batch it is answering."""

    context: Any  # TorchServe's context
    final: list  # each row's body, once answered
    row_units: dict  # row -> its units (one, or a KServe request's instances)
    kserve_rows: dict  # row -> its KServe request
    answers: list  # each unit's body, once answered
    sent: set = dataclasses.field(default_factory=set)  # rows answered early (and a ready carrier)
    carrier: Optional[int] = None  # a ready row that carries the batch as a stream

    def answered_early(self) -> int:
        return len(self.sent) - (self.carrier is not None)


class ExplainerFlow:
    """Mixin for the handlers: per-request parsing, policy and answers.

    The handler sets ``explain_settings`` and calls ``_init_access`` in
    ``initialize``, and provides ``_parse(row)``, ``_prepare(idx, request)`` and
    ``_answer_batch(items, answers)``.
    """

    def _init_access(self) -> None:
        adopt_envelope(self)
        s = self.explain_settings
        secret = load_secret(s.token_env, s.token_file, os.environ)
        self.gate = ExplanationGate(s.enabled, s.policy, s.priority_header, s.priority_values, s.on_denied,
                                    s.max_per_batch, secret, s.routes)
        logger.info("explanations: policy=%s on_denied=%s token=%s max_per_batch=%s routes=%s",
                    s.policy if s.enabled else "off", s.on_denied, "required" if secret is not None else "none",
                    s.max_per_batch, ",".join(s.routes))

    cache = ExplanationCache(0, 0)  # off until _init_cache
    context = _PerThread()  # TorchServe's context of the batch being answered (a UnitResponses)
    _batch = _PerThread()  # the batch being answered (a _Batch)
    _lane = _PerThread()  # with asyncCommunication: the MicroBatcher batch being answered
    batcher: Optional[MicroBatcher] = None  # with asyncCommunication: batches requests in the worker
    foreign_envelope = False  # a service envelope other than KServe's wraps the answers
    model_version = None

    def _init_cache(self, context) -> None:
        """The explanation cache (``explain.cache_mb``, ``cache_entries``) and the model
        version its keys carry: the MAR's model version and a hash of the MAR's files."""
        s = self.explain_settings
        self.cache = ExplanationCache(int(s.cache_mb * 2**20), s.cache_entries)
        self.model_version = None
        if self.cache.enabled:
            began = time.perf_counter()
            fingerprint = fingerprint_files(context.system_properties.get("model_dir"))
            self.model_version = model_version(context.manifest, fingerprint)
            # every setting is part of the key: env overrides change answers without changing the MAR
            self._settings_key = {"handler": dataclasses.asdict(self.model_settings), "explain": dataclasses.asdict(s)}
            logger.info("explanation cache: %s MB, %d entries, model version %s (hashed in %.0f ms)", s.cache_mb,
                        s.cache_entries, self.model_version, (time.perf_counter() - began) * 1000)

    def explanation_key(self, data: bytes, method: str, target: Optional[int], params: dict) -> Optional[str]:
        """The cache key of an explanation (None when the cache is off). ``target``: the
        class index the request named, or None for the predicted class, keyed as
        :data:`~tsexplain.cache.PREDICTED` (a hit under it must pass :meth:`usable_hit`)."""
        if not self.cache.enabled:
            return None
        return cache_key(data, self.model_version, method, PREDICTED if target is None else target,
                         {"settings": self._settings_key, "request": params})

    def cached_explanation(self, key: Optional[str]) -> Optional[dict]:
        """The cached explanation under ``key`` (a fresh copy) or None. The caller counts
        it with :meth:`count_cache` once it has checked the hit with :meth:`usable_hit`."""
        return None if key is None else self.cache.get(key)

    def count_cache(self, hit: bool, method: Optional[str] = None) -> None:
        self.count("ExplanationCacheHits" if hit else "ExplanationCacheMisses", method=method)

    def usable_hit(self, found: dict, target: Optional[int], predicted: int) -> bool:
        """Whether a cached explanation answers a request whose named ``target`` is given
        (always) or None: then only when it explains ``predicted``, the class this batch's
        forward predicts for the request. A near-tie can flip with the batch's company, and
        an answer must never pair the predictions with a map of another class. An unusable
        hit counts as a miss; the request's fresh explanation replaces the entry."""
        if target is not None or found["target"]["index"] == predicted:
            return True
        self.cache.reject()
        return False

    @property
    def concurrent(self) -> bool:
        """True with TorchServe's ``asyncCommunication``: explanations in a lane of their own."""
        return self.batcher is not None

    def _init_concurrency(self, context, model, tokenizer=None):
        """The model the explainers use: ``model`` itself, or with TorchServe's
        ``asyncCommunication: true`` a copy of its module tree over the same weights
        (:func:`~tsexplain.concurrency.shared_weights_copy`), explained in a lane of
        its own while the next requests are predicted (docs/design.md, "Concurrent
        explanations"). Returns ``(model, tokenizer)`` for the explainers."""
        config = getattr(context, "model_yaml_config", None) or {}
        self.batcher = None
        if config.get("asyncCommunication") is not True:
            return model, tokenizer
        batch_size = int(context.system_properties.get("batch_size") or 1)
        if batch_size != 1:
            raise ConfigError(f"asyncCommunication: true needs batchSize: 1 (got {batch_size}): the worker then "
                              "batches requests itself (explain.async_batch_size, async_max_batch_delay_ms)")
        if self.foreign_envelope:
            raise ConfigError("asyncCommunication: true works with no service_envelope or KServe's only")
        if not serialize_worker_socket(context):
            raise ConfigError("asyncCommunication: true: TorchServe's Service was not found while loading "
                              "(TorchServe 0.12 is supported)")
        try:
            view = shared_weights_copy(model)
        except TypeError as exc:
            raise ConfigError(f"asyncCommunication: true: {exc}") from None
        s = self.explain_settings
        self.batcher = MicroBatcher(self._run_concurrent_batch, s.async_batch_size, s.async_max_batch_delay_ms / 1000,
                                    s.async_max_queued, name=context.model_name)
        logger.info("concurrent explanations (asyncCommunication): worker batches of %d within %g ms, at most %d "
                    "requests queued; explainers on a copy of the module tree sharing the model's weights",
                    s.async_batch_size, s.async_max_batch_delay_ms, s.async_max_queued)
        # a fast tokenizer is not safe to call from two threads at once (its padding state is shared)
        return view, (copy.deepcopy(tokenizer) if tokenizer is not None else None)

    def handle(self, data, context):
        """TorchServe's entry point: answers the batch, or with ``asyncCommunication``
        returns the coroutine TorchServe's async service awaits."""
        if self.batcher is not None:
            return self._handle_async(data, context)
        return self._handle_batch(data, context)

    async def _handle_async(self, data, context):
        """One frontend message (one request, as batchSize is 1): queued for the worker's
        own batches; answered when ready, whatever else is still explaining.

        TorchServe 0.12's async frontend forgets a request only when a message marks its
        stream ended (``ts_stream_next: false``), and a first message so marked loses its
        HTTP headers. So each request gets two messages: its answer (streamed with
        ``ts_stream_next: true`` for 2xx; a whole response for errors, after which
        TorchServe closes the connection as it always does on errors), sent by the batch
        thread as soon as it is ready, and then this coroutine's return, an empty end of
        stream. Never raises: an error message here would fail every request in the worker.
        """
        waiting = []
        for idx, row in enumerate(data):
            try:
                waiting.append(self.batcher.submit((row, context, idx)))
            except Overloaded as exc:
                logger.warning("request refused: %s", exc)
                waiting.append(RequestError(f"the worker is overloaded ({exc}); try again later", "overloaded", 503))
        bodies = []
        for idx, pending in enumerate(waiting):
            if isinstance(pending, RequestError):
                body = answer_error(context, idx, pending)
                sent = self._send_answer(context, idx, body)
            else:
                try:
                    body, sent = await asyncio.wrap_future(pending)
                except Exception as exc:  # noqa: BLE001 - answered as this request's own failure
                    logger.error("request failed in the worker: %s", type(exc).__name__)
                    body = answer_error(context, idx, RequestError("the request failed on the server",
                                                                   "server_error", 503))
                    sent = self._send_answer(context, idx, body)
            if sent:  # the answer is out: end its stream
                context.set_response_header(idx, "ts_stream_next", "false")
                body = ""
            bodies.append(body)
        return bodies

    @staticmethod
    def _send_answer(context, idx: int, body: str) -> bool:
        """Send request ``idx``'s answer now on TorchServe's worker socket (the first of its
        two messages, see ``_handle_async``). False where there is no serialized socket."""
        sock = getattr(context, "cl_socket", None)
        if not isinstance(sock, SerializedSocket):
            return False
        streamed = (context.get_response_status(idx)[0] or 200) < 400
        try:
            sock.sendall(create_predict_response({idx: body}, {idx: context.request_ids[idx]}, "Prediction success",
                                                 200, context, ts_stream_next=streamed))
        except OSError as exc:
            logger.error("answer not sent: %s", type(exc).__name__)
            return False
        return True

    def _deliver(self, lane, k: int, body: str) -> None:
        """Answer item ``k`` of a worker batch: send it, then wake its coroutine."""
        if lane.delivered(k):
            return
        _, context, idx = lane.items[k]
        lane.deliver(k, (body, self._send_answer(context, idx, body)))

    def _run_concurrent_batch(self, lane) -> None:
        """Answer a worker batch (``lane.items``: (row, its request's context, its index
        there)) with the usual flow; ``answer_early`` hands it to the explanation lane."""
        rows = lane.items
        merged = copy.copy(rows[0][1])  # the requests' own RequestProcessors: statuses land in their contexts
        merged.request_ids = {k: context.request_ids[idx] for k, (_, context, idx) in enumerate(rows)}
        merged.request_processor = [context.request_processor[idx] for _, context, idx in rows]
        merged.cl_socket = None
        merged.stopping_criteria = None
        self._lane = lane
        try:
            bodies = self._handle_batch([row for row, _, _ in rows], merged, lane.first_arrival)
        finally:
            self._lane = None
        for k, body in enumerate(bodies):
            self._deliver(lane, k, body)

    def _handle_batch(self, data, context, arrived: Optional[float] = None):
        """Answer one batch; ``arrived``: when its first request reached the worker
        (``time.monotonic``; default now), where deadlines count from."""
        start = time.perf_counter()
        batch_start = time.monotonic() if arrived is None else arrived  # deadlines count from here
        self.context = responses = UnitResponses(context)
        final: list = [None] * len(data)
        units, kserve_rows, row_units = [], {}, {}  # units: (row, body); KServe rows: {row: request}
        for idx, row in enumerate(data):
            try:
                request = self._kserve_request(context, idx, row)
            except RequestError as error:
                final[idx] = answer(context, idx, kserve.error_entry(error.to_json()), error.status)
                continue
            if request is None:
                row_units[idx] = range(len(units), len(units) + 1)
                units.append((idx, row))
            else:
                kserve_rows[idx] = request
                row_units[idx] = range(len(units), len(units) + len(request.instances))
                units.extend((idx, {"body": instance}) for instance in request.instances)

        answers: list = [None] * len(units)
        self._batch = _Batch(context, final, row_units, kserve_rows, answers)
        items, granted = [], 0
        for unit, (idx, row) in enumerate(units):
            try:
                request = self._parse(row)
                self._check_overrides(request)
                limit_ms = self._deadline_ms(request)
                item = self._prepare(unit, request)
                if is_explain_request(context, idx):
                    headers = lower_case_headers(context.get_all_request_header(idx))
                    decision = self.gate.decide(headers, request.priority, granted)
                    if decision.allowed:
                        item.explain, granted = True, granted + 1
                        item.deadline = None if limit_ms is None else Deadline(limit_ms, batch_start)
                    else:
                        self.count("ExplanationsDenied", method=item.method)
                        if self.explain_settings.on_denied == "reject":
                            kind = "too_many_explanations" if decision.status == 429 else "explanation_denied"
                            raise RequestError(decision.reason, kind, decision.status)
                        item.skipped = decision.reason
                items.append(item)
            except RequestError as error:
                answers[unit] = answer_error(responses, unit, error)
        if items:
            try:
                self._answer_batch(items, answers)
            except Exception as exc:
                if not self._batch.sent:
                    raise  # nothing answered yet: TorchServe fails the batch as a whole
                # some requests are answered: the rest must be too, never the batch
                logger.error("batch failed after early answers: %s", type(exc).__name__)
                for unit, body in enumerate(answers):
                    if body is None:
                        answers[unit] = answer_error(responses, unit, explanation_failed(exc))

        for idx in row_units:
            if idx not in self._batch.sent:
                final[idx] = self._finish_row(idx)
        logger.info("batch size=%d explained=%d answered_early=%d", len(data), granted, self._batch.answered_early())
        if kserve_rows:
            logger.info("kserve requests=%d instances=%d", len(kserve_rows), sum(len(row_units[i]) for i in kserve_rows))
        context.metrics.add_time("HandlerTime", round((time.perf_counter() - start) * 1000, 2), None, "ms")
        self._batch = None
        return final

    def _finish_row(self, idx: int) -> str:
        """The final body of row ``idx`` from its units' answers, with its status set."""
        batch = self._batch
        context, members = batch.context, batch.row_units[idx]
        if idx in batch.kserve_rows:
            return self._kserve_answer(context, idx, batch.kserve_rows[idx],
                                       [(self.context.status(u), batch.answers[u]) for u in members])
        unit = members[0]
        code, phrase = self.context.statuses.get(unit, (200, "OK"))
        context.set_response_status(code, phrase, idx)
        context.set_response_content_type(idx, JSON_CONTENT_TYPE)
        return batch.answers[unit]

    def answer_early(self) -> None:
        """Send the answers that are ready now, before the batch's remaining explanation work.

        The handler calls this when every request's answer is written except those
        of explanations still to compute. TorchServe 0.12 takes one message per batch
        unless an entry keeps it open as a stream; that entry, the carrier, is answered
        chunked and its stream ends with the batch. ``explain.early_answer_carrier``:
        ``ready`` (default): one ready 2xx answer (an explanation-route answer, else
        a prediction) carries the batch, whole in its first chunk, so every status
        is exact, and the other ready answers go at once (nothing is
        sent with fewer than two ready answers); ``explanation``: every ready answer
        goes at once and the first waiting explanation carries the batch, its 200
        sent now and its body (or error object) when done.
        See docs/design.md, "Early answers". Off with ``explain.early_answers: false``,
        outside TorchServe (no worker socket) and under a service envelope that
        rewrites the answers (only KServe's are adopted).
        """
        batch = self._batch
        if batch is not None and self._lane is not None:
            self._hand_over(batch, self._lane)
            return
        if batch is None or batch.sent or not self.explain_settings.early_answers or self.foreign_envelope:
            return
        context = batch.context
        socket = getattr(context, "cl_socket", None)
        if socket is None or str(os.getenv("LOCAL_RANK", "0")) != "0":
            return
        ready, waiting = self._ready_rows(batch)
        carried_by_ready = self.explain_settings.early_answer_carrier == "ready"
        if not waiting or len(ready) < (2 if carried_by_ready else 1):
            return
        bodies = {idx: batch.final[idx] if batch.final[idx] is not None else self._finish_row(idx) for idx in ready}
        if carried_by_ready:
            # never an error: TorchServe closes the connection after an error status's headers
            fine = [idx for idx in ready if (context.get_response_status(idx)[0] or 200) < 400]
            if not fine:
                return
            # who minds waiting least: explanation-route answers, then predictions
            carrier = min(fine, key=lambda idx: (0 if is_explain_request(context, idx) else 1, -idx))
        else:
            carrier = min(waiting)
            bodies[carrier] = ""
            context.set_response_status(200, "OK", carrier)
            context.set_response_content_type(carrier, JSON_CONTENT_TYPE)
        request_ids = context.request_ids
        message_ids = {idx: request_ids[idx] for idx in sorted(bodies)}
        # per-request stream control: the carrier continues, the others end here
        context.stopping_criteria = {idx: (lambda _: False) if idx == carrier else (lambda _: None)
                                     for idx in message_ids}
        try:
            message = create_predict_response(bodies, message_ids, "Prediction success", 200, context)
        finally:
            context.stopping_criteria = None
        socket.sendall(message)
        for idx in ready:
            batch.final[idx] = bodies[idx]
            if idx != carrier:
                del request_ids[idx]  # TorchServe's final message carries the others only
        if carried_by_ready:
            batch.final[carrier] = ""  # its stream ends, empty, with the batch's final message
            batch.carrier = carrier
        batch.sent.update(ready)
        self.count("EarlyAnswers", batch.answered_early())

    @staticmethod
    def _ready_rows(batch: _Batch) -> tuple[list, list]:
        """(rows whose answers are all written, rows with explanation work left), in row order;
        the ready ones include rows answered already (a KServe request that failed to parse)."""
        ready, waiting = [], []
        for idx, members in batch.row_units.items():
            (ready if all(batch.answers[u] is not None for u in members) else waiting).append(idx)
        ready += [idx for idx, body in enumerate(batch.final) if body is not None]
        return sorted(ready), waiting

    def _hand_over(self, batch: _Batch, lane) -> None:
        """With ``asyncCommunication``: answer every ready request of the batch now, then
        leave the prediction lane (the next batch starts) and wait for the explanation lane."""
        if not lane.in_prediction_lane:
            return
        ready, _ = self._ready_rows(batch)
        for idx in ready:
            if batch.final[idx] is None:
                batch.final[idx] = self._finish_row(idx)
            self._deliver(lane, idx, batch.final[idx])
        batch.sent.update(ready)
        if ready:
            self.count("EarlyAnswers", len(ready))
        lane.leave_prediction_lane()
        if lane.explanation_lane_wait_s > 0.001:
            logger.info("explanation lane: waited %.0f ms", lane.explanation_lane_wait_s * 1000)

    def _kserve_request(self, context, idx: int, row) -> "Optional[kserve.KServeRequest]":
        """The KServe request in row ``idx``, or ``None`` for a plain request.

        Only rows without TorchServe's ``url_path`` header (the KServe and legacy
        routes) are read as KServe; ``/predictions`` and ``/explanations`` keep
        the plain protocol with or without a ``service_envelope``.
        """
        if EXPLANATIONS_ROUTE_MARKER in lower_case_headers(context.get_all_request_header(idx)):
            return None
        try:
            body = request_body(row)
        except RequestError:
            return None
        obj = kserve.detect(body)
        if obj is None:
            return None
        return kserve.split_request(obj, self.explain_settings.max_instances)

    def _kserve_answer(self, context, idx: int, request, results) -> str:
        """One KServe response for row ``idx`` from its instances' (status, JSON) answers."""
        entries = [json.loads(body) if status == 200 else kserve.error_entry(json.loads(body))
                   for status, body in results]
        model = (getattr(context, "manifest", None) or {}).get("model") or {}
        body = kserve.response(request, is_explain_request(context, idx), entries,
                               request_id=context.get_request_id(idx) or "",
                               model_name=context.model_name, model_version=model.get("modelVersion"))
        return answer(context, idx, body, kserve.overall_status([status for status, _ in results]))

    def answer_prediction(self, item: Prepared, ranked) -> str:
        """The answer of a request that gets no explanation: the stock ``{label: p}``
        body, or the explanation envelope with ``null`` when one was asked for and denied."""
        if item.skipped is not None:
            return answer(self.context, item.idx, envelope(ranked, None, item.skipped))
        return answer(self.context, item.idx, {label: p for _, label, p in ranked})

    def inject_fault(self) -> None:
        """Raise the failure ``explain.inject_fault`` asks for (tests of failure isolation)."""
        fault = self.explain_settings.inject_fault
        if fault == "oom":
            raise RuntimeError("CUDA out of memory (injected by explain.inject_fault)")
        if fault == "error":
            raise RuntimeError("failure injected by explain.inject_fault")

    def _deadline_ms(self, request) -> Optional[int]:
        """The request's deadline: ``explain.deadline_ms``, or less when the request asks."""
        limit, asked = self.explain_settings.deadline_ms, getattr(request, "deadline_ms", None)
        if asked is None:
            return limit
        if limit is not None and asked > limit:
            raise RequestError(f"'deadline_ms' may be at most {limit} for this model", "bad_deadline_ms")
        return asked

    def within_deadlines(self, keys: list, items: list, work):
        """Run ``work(keys)``, the explanation work of ``items[k]`` for ``k`` in ``keys``,
        each request within its own deadline.

        Requests already past their deadline get a 504 error. The work runs under the
        earliest deadline of the others; when it is stopped there, it runs again for
        those still in time (so a request never fails for another's deadline).
        Returns ``(keys explained, what work returned or None, {key: RequestError})``.
        """
        late: dict = {}
        pending = list(keys)
        while pending:
            for k in [k for k in pending if items[k].deadline is not None and items[k].deadline.expired()]:
                late[k] = deadline_error(items[k].deadline)
                pending.remove(k)
            if not pending:
                break
            deadlines = [items[k].deadline for k in pending if items[k].deadline is not None]
            try:
                with enforce(min(deadlines, key=lambda d: d.end, default=None)):
                    result = work(pending)
                break
            except DeadlineExceeded:
                continue  # the earliest deadline passed: answer it, run again for the others
        if late:
            self.count("ExplanationsTimedOut", len(late))
            logger.warning("explanation deadline exceeded: %d request(s), limits_ms=%s", len(late),
                           sorted({items[k].deadline.limit_ms for k in late}))
        return pending, (result if pending else None), late

    def _check_overrides(self, request) -> None:
        settings = self.explain_settings
        for name in settings.override_fields:
            if getattr(request, name, None) is not None and not settings.allows_override(name):
                raise RequestError(f"'{name}' may not be set in requests to this model", "override_not_allowed")

    def count(self, name: str, value: float = 1, unit: Optional[str] = None, method: Optional[str] = None,
              metric_type: MetricTypes = MetricTypes.GAUGE) -> None:
        """A TorchServe custom metric, by method (counter, or a time of ``metric_type`` when
        ``unit``); ``method``: the one the request used (default: the model's default method).
        Emitted dimensions: Method, then ModelName and Level (added by TorchServe); a metrics
        YAML that declares the metric must name exactly these, in this order
        (``deploy/metrics.yaml``)."""
        dims = [Dimension("Method", method or self.explain_settings.method)]
        if unit is None:
            self.context.metrics.add_counter(name, value, None, dims)
        else:
            self.context.metrics.add_time(name, value, None, unit, dims, metric_type)

    def record_explanation(self, elapsed_ms: float, method: Optional[str] = None, **fields) -> None:
        """Metrics and one log line per explanation served (no payloads, no values).
        ``ExplanationLatencySeconds`` is a histogram for Prometheus (whose default buckets,
        5 ms to 10 s, are in seconds); ``ExplanationLatency`` the same time in ms, as before."""
        method = method or self.explain_settings.method
        self.count("ExplanationsServed", method=method)
        self.count("ExplanationLatency", round(elapsed_ms, 2), unit="ms", method=method)
        self.count("ExplanationLatencySeconds", round(elapsed_ms / 1000, 6), unit="s", method=method,
                   metric_type=MetricTypes.HISTOGRAM)
        detail = " ".join(f"{k}={v}" for k, v in fields.items())
        logger.info("explanation method=%s %s elapsed_ms=%.2f", method, detail, elapsed_ms)
