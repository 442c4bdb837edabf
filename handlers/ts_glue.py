"""TorchServe glue: the one module that touches TorchServe 0.12, and every workaround for it.

The handlers (``image_explainer.py``, ``text_explainer.py``) subclass
:class:`ExplainHandler`, which turns TorchServe's batch into the serving flow's rows
(:mod:`tsexplain.serving.flow`) and the rows' answers back. What TorchServe 0.12
needs worked around, each with the 0.12 code it answers to:

1. **Routes.** 0.12 marks a request that came through ``/explanations`` or a KServe
   ``:explain``/``/explain`` route with the header ``explain: True``
   (``InferenceRequestHandler``), and adds ``url_path`` only on ``/predictions`` and
   ``/explanations`` (:func:`row_of`). A KServe route cannot be told from the
   legacy ones otherwise.
2. **KServe envelopes.** ``service_envelope=kserve|kservev2`` wraps the handler in an
   envelope that reads the first request of a batch only
   (``ts/torch_handler/request_envelope/kserve*.py``); ``TsModelLoader.load``
   (``ts/model_loader.py``) builds it around ``handle`` and calls ``initialize`` from
   the same frame. :func:`adopt_envelope` finds it there and makes it pass requests
   through; the flow reads KServe bodies itself.
3. **asyncCommunication** (predictions that do not wait for explanations; docs/design.md,
   "Concurrent explanations"):
   - ``ts/async_service.py`` awaits the entry point as a coroutine per frontend message;
     the worker batches requests itself (:class:`~tsexplain.serving.concurrency.MicroBatcher`).
   - The 0.12 frontend (``AsyncBatchAggregator``) forgets a request only on an entry
     marked ``ts_stream_next: false``, and a *first* entry so marked loses its HTTP
     headers; a non-200 message fails every request in the worker. So each request
     gets two messages: its answer (2xx streamed with ``ts_stream_next: true``; errors
     whole), sent as soon as it is ready, then the coroutine's return, an empty end of
     stream (:meth:`ExplainHandler._handle_async`). The coroutine never raises.
   - Batch threads and TorchServe's sender thread share the worker socket
     (``Service.cl_socket``): :func:`serialize_worker_socket` makes the Service keep a
     :class:`SerializedSocket`, found on the loader's stack as in 2.
4. **Metrics.** Custom metrics go through ``context.metrics`` with a ``Method``
   dimension (:class:`TorchServeMetrics`); in async mode each request has its own
   deep-copied context, so each batch counts on its own.
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import threading
import time
from typing import Optional

import torch
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.protocol.otf_message_handler import create_predict_response
from ts.service import Service

from tsexplain.serving.audit import AuditTrail
from tsexplain.serving.cache import ExplanationCache, fingerprint_files, model_version
from tsexplain.serving.concurrency import MicroBatcher, Overloaded, check_async_batch_size, shared_weights_copy
from tsexplain.serving.errors import ConfigError, RequestError
from tsexplain.serving.answers import JSON_CONTENT_TYPE, Answer
from tsexplain.serving.flow import ExplainFlow, Metrics, Row
from tsexplain.serving.models import is_scripted
from tsexplain.serving.policy import ExplanationGate, lower_case_headers
from tsexplain.serving.settings import load_settings
from tsexplain.serving.tokens import ExplainTokens, parse_token_specs

logger = logging.getLogger(__name__)
KSERVE_ENVELOPES = ("KServeEnvelope", "KServev2Envelope")
EXPLANATIONS_ROUTE_MARKER = "url_path"  # 1.: set on /predictions and /explanations only


def row_of(body, context, idx: int) -> Row:
    """Request ``idx`` of TorchServe's batch as one of the flow's rows (1.: which route it came through)."""
    headers = lower_case_headers(context.get_all_request_header(idx))
    return Row(body, headers, explain=context.get_request_header(idx, "explain") == "True",
               plain=EXPLANATIONS_ROUTE_MARKER in headers, request_id=context.get_request_id(idx) or "")


def set_answer(context, idx: int, answer: Answer) -> str:
    """Request ``idx``'s status and content type set in ``context``; returns its body."""
    context.set_response_status(answer.status, answer.phrase, idx)
    context.set_response_content_type(idx, JSON_CONTENT_TYPE)
    return answer.body


def loader_frames():
    """The frames above the caller's caller, innermost first: during ``initialize``, they
    reach TorchServe 0.12's ``TsModelLoader.load``, which holds the envelope and the Service."""
    frame = sys._getframe(2)
    while frame is not None:
        yield frame
        frame = frame.f_back


def adopt_envelope(handler) -> None:
    """2.: make TorchServe's stock KServe envelope pass requests through unchanged.
    Another envelope rewrites answers: ``handler.foreign_envelope`` is set."""
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
                handler.foreign_envelope = True
                logger.warning("service envelope %s wraps the handler; its format is not the handler's", name)
            return


class SerializedSocket:
    """3.: TorchServe's worker socket with one writer at a time. With ``asyncCommunication``
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
    """3.: make TorchServe's ``Service`` (the one whose context is ``context``) keep its worker
    socket as a :class:`SerializedSocket`. TorchServe 0.12 builds the Service in
    ``TsModelLoader.load`` and calls ``initialize`` from there; the Service is found on
    the stack and sets its socket after loading. Returns False when not found."""
    for frame in loader_frames():
        for value in list(frame.f_locals.values()):
            if isinstance(value, Service) and value.context is context:
                plain = type(value).set_cl_socket
                value.set_cl_socket = lambda sock, service=value: plain(
                    service, sock if isinstance(sock, SerializedSocket) else SerializedSocket(sock))
                return True
    return False


def send_answer(context, idx: int, answer: Answer) -> bool:
    """3.: send request ``idx``'s answer now on the worker socket, the first of its two
    messages. False where there is no serialized socket (or the send failed)."""
    sock = getattr(context, "cl_socket", None)
    if not isinstance(sock, SerializedSocket):
        return False
    body = set_answer(context, idx, answer)
    try:
        sock.sendall(create_predict_response({idx: body}, {idx: context.request_ids[idx]}, "Prediction success",
                                             200, context, ts_stream_next=answer.status < 400))
    except OSError as exc:
        logger.error("answer not sent: %s", type(exc).__name__)
        return False
    return True


class TorchServeMetrics(Metrics):
    """4.: the flow's counts as TorchServe custom metrics, by method (the model's default
    method when a count has none). Emitted dimensions: ``Method``, the count's own (``Reason``),
    then ``ModelName`` and ``Level`` (added by TorchServe): in Prometheus mode a metrics YAML
    must declare exactly these, in this order (``deploy/metrics.yaml``), or the series is lost
    or mislabelled. A time is also sent in seconds as a histogram (``<name>Seconds``):
    TorchServe's histogram buckets (5 ms to 10 s) are in seconds."""

    def __init__(self, context, default_method: str):
        self.metrics = context.metrics
        self.default_method = default_method

    def _dimensions(self, method: Optional[str], extra: dict) -> list:
        return [Dimension("Method", method or self.default_method)] + [Dimension(k, v) for k, v in extra.items()]

    def count(self, name: str, value: float = 1, method: Optional[str] = None, **dimensions: str) -> None:
        self.metrics.add_counter(name, value, None, self._dimensions(method, dimensions))

    def time(self, name: str, ms: float, method: Optional[str] = None) -> None:
        dimensions = self._dimensions(method, {})
        self.metrics.add_time(name, ms, None, "ms", dimensions)
        self.metrics.add_time(f"{name}Seconds", round(ms / 1000, 6), None, "s", dimensions, MetricTypes.HISTOGRAM)


def worker_device(context) -> torch.device:
    """The device TorchServe gave this worker (``gpu_id``), or the CPU."""
    gpu_id = context.system_properties.get("gpu_id")
    return torch.device(f"cuda:{gpu_id}" if torch.cuda.is_available() and gpu_id is not None else "cpu")


class ExplainHandler:
    """TorchServe's entry points (``initialize``, ``handle``) around the serving flow.

    A handler sets ``modality`` and implements :meth:`make_runner`, which loads the
    model and builds its runner over ``self.explained_copy(model)``.
    """

    modality: str
    foreign_envelope = False  # a service envelope other than KServe's wraps the answers
    batcher: Optional[MicroBatcher] = None  # with asyncCommunication: batches requests in the worker

    def make_runner(self, context):
        raise NotImplementedError

    def initialize(self, context):
        name = context.model_name
        self.settings = settings = load_settings(self.modality, getattr(context, "model_yaml_config", None), name,
                                                 os.environ)
        adopt_envelope(self)
        self.concurrent = self._check_concurrency(context)
        self.runner = self.make_runner(context)
        explain = settings.explain
        tokens = ExplainTokens.load(parse_token_specs(explain.tokens), explain.token_env, explain.token_file, os.environ)
        gate = ExplanationGate(explain.enabled, explain.policy, explain.priority_header, explain.priority_values,
                               explain.on_denied, explain.max_per_batch, tokens, explain.routes)
        logger.info("explanations: policy=%s on_denied=%s tokens=%s max_per_batch=%s routes=%s",
                    explain.policy if explain.enabled else "off", explain.on_denied,
                    ",".join(tokens.names) or "none", explain.max_per_batch, ",".join(explain.routes))
        cache = ExplanationCache(int(explain.cache_mb * 2**20), explain.cache_entries)
        version = ((context.manifest or {}).get("model") or {}).get("modelVersion")
        fingerprint = ""
        if cache.enabled or explain.audit.enabled:  # the MAR's files hashed once: cache keys and audit records
            began = time.perf_counter()
            fingerprint = fingerprint_files(context.system_properties["model_dir"])
            logger.info("model files hashed in %.0f ms: %s", (time.perf_counter() - began) * 1000, fingerprint[:16])
        cache_version = model_version(context.manifest, fingerprint) if cache.enabled else ""
        if cache.enabled:
            logger.info("explanation cache: %s MB, %d entries, model version %s", explain.cache_mb,
                        explain.cache_entries, cache_version)
        self.trail = None
        if explain.audit.enabled:  # a sink that cannot be opened fails the load under on_failure: fail
            self.trail = AuditTrail.open(explain.audit, model_name=name, model_version=model_version(
                context.manifest, fingerprint), mar_sha256=fingerprint)
            atexit.register(self.trail.close)
        self.flow = ExplainFlow(self.runner, settings, gate, cache, model_name=name, model_version=version,
                                cache_version=cache_version, concurrent=self.concurrent, trail=self.trail)
        if self.concurrent:
            self.batcher = MicroBatcher(self._run_async_batch, explain.async_batch_size,
                                        explain.async_max_batch_delay_ms / 1000, explain.async_max_queued, name=name)
            logger.info("concurrent explanations (asyncCommunication): worker batches of %d within %g ms, at most %d "
                        "requests queued; explainers on a copy of the module tree sharing the model's weights",
                        explain.async_batch_size, explain.async_max_batch_delay_ms, explain.async_max_queued)
        self.initialized = True

    def _check_concurrency(self, context) -> bool:
        """True with ``asyncCommunication: true`` in the model config (3.), checked to work."""
        config = getattr(context, "model_yaml_config", None) or {}
        if config.get("asyncCommunication") is not True:
            return False
        check_async_batch_size(int(context.system_properties.get("batch_size") or 1))
        if self.foreign_envelope:
            raise ConfigError("asyncCommunication: true works with no service_envelope or KServe's only")
        if not serialize_worker_socket(context):
            raise ConfigError("asyncCommunication: true: TorchServe's Service was not found while loading "
                              "(TorchServe 0.12 is supported)")
        return True

    def explained_copy(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model the explainers use: ``model``, or with concurrent explanations a copy
        of its module tree over the same weights (hooks on it never touch a prediction).
        A TorchScript model cannot be copied that way, and needs no copy: no hook is ever
        put on it (it serves input IG alone), so both lanes run the same module."""
        if not self.concurrent or is_scripted(model):
            return model
        try:
            return shared_weights_copy(model)
        except TypeError as exc:
            raise ConfigError(f"asyncCommunication: true: {exc}") from None

    def handle(self, data, context):
        """TorchServe's entry point: answers the batch, or with ``asyncCommunication``
        returns the coroutine TorchServe's async service awaits."""
        if self.batcher is not None:
            return self._handle_async(data, context)
        began = time.perf_counter()
        rows = [row_of(body, context, idx) for idx, body in enumerate(data)]
        self.flow.run(rows, time.monotonic(), metrics=self._metrics(context))
        bodies = [set_answer(context, idx, row.answer) for idx, row in enumerate(rows)]
        context.metrics.add_time("HandlerTime", round((time.perf_counter() - began) * 1000, 2), None, "ms")
        return bodies

    def _metrics(self, context) -> TorchServeMetrics:
        return TorchServeMetrics(context, self.settings.explain.method)

    async def _handle_async(self, data, context):
        """3.: one frontend message (one request, as batchSize is 1): queued for the worker's
        own batches, answered when ready whatever else is still explaining, then its stream
        ended. Never raises: an error message here would fail every request in the worker."""
        waiting = []
        for idx, body in enumerate(data):
            try:
                waiting.append(self.batcher.submit((body, context, idx)))
            except Overloaded as exc:
                logger.warning("request refused: %s", exc)
                waiting.append(RequestError(f"the worker is overloaded ({exc}); try again later", "overloaded"))
        bodies = []
        for idx, pending in enumerate(waiting):
            if isinstance(pending, RequestError):
                answer = Answer.error(pending)
                sent = send_answer(context, idx, answer)
            else:
                try:
                    answer, sent = await asyncio.wrap_future(pending)
                except Exception as exc:  # noqa: BLE001 - answered as this request's own failure
                    logger.error("request failed in the worker: %s", type(exc).__name__)
                    answer = Answer.error(RequestError("the request failed on the server", "server_error"))
                    sent = send_answer(context, idx, answer)
            if sent:  # the answer is out: end its stream
                context.set_response_header(idx, "ts_stream_next", "false")
                bodies.append("")
            else:
                bodies.append(set_answer(context, idx, answer))
        return bodies

    def _run_async_batch(self, lane) -> None:
        """3.: answer a worker batch (``lane.items``: (body, its request's context, its index
        there)). Rows whose answers are ready go out before the explanation work, and the
        batch then leaves the prediction lane for the next one."""
        rows = [row_of(body, context, idx) for body, context, idx in lane.items]
        index = {id(row): k for k, row in enumerate(rows)}

        def deliver(k: int, answer: Answer) -> None:
            if not lane.delivered(k):
                _, context, idx = lane.items[k]
                lane.deliver(k, (answer, send_answer(context, idx, answer)))

        def hand_over(ready: list[Row]) -> None:
            for row in ready:
                deliver(index[id(row)], row.answer)
            if ready:
                metrics.count("EarlyAnswers", len(ready))
            lane.leave_prediction_lane()
            if lane.explanation_lane_wait_s > 0.001:
                logger.info("explanation lane: waited %.0f ms", lane.explanation_lane_wait_s * 1000)

        began = time.perf_counter()
        metrics = self._metrics(lane.items[0][1])
        self.flow.run(rows, lane.first_arrival, on_ready=hand_over, metrics=metrics)
        for k, row in enumerate(rows):
            deliver(k, row.answer)
        metrics.metrics.add_time("HandlerTime", round((time.perf_counter() - began) * 1000, 2), None, "ms")
