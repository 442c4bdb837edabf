"""Settings read once at load time: model config YAML, then environment overrides.

Each section is a frozen dataclass. ``load_section`` takes the section's mapping
from the YAML, applies ``TSEXPLAIN_<MODEL>_<KEY>`` then ``TSEXPLAIN_<KEY>``
environment variables (values parsed as YAML: ``true``, ``5``, ``[64, 64]``), and
validates the result. Unknown keys and bad values raise ``ConfigError``, so a
model with nonsense settings fails to load instead of serving wrong answers.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from ..attr.names import BASELINES, CAM_METHODS, IMAGE_METHODS, INTEGRATION_METHODS, LAYOUTS, PRECISIONS, TEXT_METHODS
from .audit.settings import AuditSettings
from .config import check, env_names, is_int, is_size, load_section  # noqa: F401 (env_names, load_section: re-exported)
from .images import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, Preprocessing
from .policy import EXPLANATIONS, ROUTES
from . import schema
from .schema import HEATMAP_SIZES, IMAGE, IMAGE_OUTPUTS, MAX_DEADLINE_MS, MAX_N_STEPS, MAX_TOP_K, TEXT, Limits
from .tokens import parse_token_specs

FEATURE_LAYOUTS = ("auto",) + LAYOUTS

POLICIES = ("all", "priority", "off")
DEFAULT_DEADLINE_MS = 30_000  # well inside TorchServe's default responseTimeout of 120 s
ON_DENIED = ("predict", "reject")


@dataclass(frozen=True)
class ExplainAccessSettings:
    """Who may get an explanation: the ``explain:`` keys shared by every model.

    ``policy``: ``all`` | ``priority`` (only requests whose ``priority_header``
    or JSON ``"priority"`` is one of ``priority_values``) | ``off``.
    ``on_denied``: ``predict`` (200, prediction only) | ``reject`` (403, or 429
    past ``max_per_batch``). ``token_env``/``token_file``: where the shared secret
    that the ``X-Explain-Token`` header must carry is read from (unset: no token);
    ``tokens``: several named ones (``{team-a: {env: VAR}, team-b: {file: path}}``,
    :mod:`.tokens`), the single one being named ``default``; the audit record keeps
    the name of the token a request presented.
    ``audit``: the audit trail (:class:`~.audit.settings.AuditSettings`; a mapping in
    the YAML, with its own environment overrides ``TSEXPLAIN_<MODEL>_AUDIT_<KEY>``).
    ``request_overrides``: the request fields allowed to change the defaults.
    ``routes``: ``explanations`` (``/explanations/{model}``) and ``kserve`` (the
    KServe explain routes, and any request marked ``explain: True`` by its client
    on the legacy routes, which TorchServe cannot tell apart).
    ``max_instances``: the most instances one KServe v1/v2 request may carry.
    ``deadline_ms``: time allowed to one request's explanation, counted from when
    the worker starts on its batch (with ``asyncCommunication``, from when the batch's
    first request reached the worker); past it the request gets a 504 (``None``: no
    limit). A request may ask for less with ``"deadline_ms"``.
    ``async_batch_size``, ``async_max_batch_delay_ms``, ``async_max_queued``: with
    TorchServe's ``asyncCommunication: true`` (and ``batchSize: 1``) the worker takes
    each request as it comes and batches them itself: at most ``async_batch_size``,
    closed ``async_max_batch_delay_ms`` after it could start (as ``maxBatchDelay``); past
    ``async_max_queued`` requests in the worker, new ones get 503 ``overloaded``.
    Predictions then never wait for explanation work (docs/design.md, "Concurrent
    explanations").
    """

    section = "explain"
    enabled: bool = True
    policy: str = "all"
    priority_header: str = "X-Priority"
    priority_values: list = field(default_factory=lambda: ["high", "audit"])
    on_denied: str = "reject"
    token_env: Optional[str] = None
    token_file: Optional[str] = None
    tokens: Optional[dict] = None  # named explain tokens: {name: {env: VAR} | {file: path}}
    audit: Any = None  # the explain.audit mapping; AuditSettings once loaded
    max_per_batch: Optional[int] = None
    request_overrides: Optional[list] = None  # None: every override field
    routes: list = field(default_factory=lambda: list(ROUTES))
    max_instances: int = 64  # instances in one KServe v1/v2 request
    inject_fault: Optional[str] = None  # tests only: "error" or "oom" makes every explanation fail
    deadline_ms: Optional[int] = DEFAULT_DEADLINE_MS  # explanation work per request; None: no deadline
    cache_mb: float = 32  # explanation cache per worker (0: off); see docs/design.md
    cache_entries: int = 4096
    async_batch_size: int = 8  # with asyncCommunication: the worker's own batches
    async_max_batch_delay_ms: float = 10
    async_max_queued: int = 256

    modality = ""  # the kind of model: its request fields (schema)
    override_fields = ()  # the request fields ``request_overrides`` may list (schema)

    def __post_init__(self):
        if self.policy is False:  # YAML 1.1 reads an unquoted `off` as false
            object.__setattr__(self, "policy", "off")
        check(isinstance(self.enabled, bool), "explain.enabled must be true or false")
        check(self.policy in POLICIES, f"explain.policy must be one of {list(POLICIES)}")
        check(isinstance(self.priority_header, str) and re.fullmatch(r"[A-Za-z0-9-]+", self.priority_header or ""),
               "explain.priority_header must be an HTTP header name")
        check(isinstance(self.priority_values, (list, tuple)) and self.priority_values
               and all(isinstance(v, str) and v.strip() for v in self.priority_values),
               "explain.priority_values must be a non-empty list of strings")
        check(self.on_denied in ON_DENIED, f"explain.on_denied must be one of {list(ON_DENIED)}")
        check(not (self.token_env and self.token_file), "explain: set token_env or token_file, not both")
        for name in ("token_env", "token_file"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, str) and value), f"explain.{name} must be a non-empty string")
        check(self.max_per_batch is None or is_int(self.max_per_batch, 0, 1 << 20),
               "explain.max_per_batch must be a non-negative int or null")
        check(isinstance(self.routes, (list, tuple)) and EXPLANATIONS in self.routes and set(self.routes) <= set(ROUTES),
               "explain.routes must be [explanations] or [explanations, kserve]")
        parse_token_specs(self.tokens)  # names and sources only: the secrets are read at initialize
        # the mapping; load_settings validates it into AuditSettings with its environment overrides
        check(self.audit is None or isinstance(self.audit, (Mapping, AuditSettings)),
              "explain.audit must be a mapping (record, sink, ...)")
        check(is_int(self.max_instances, 1, 4096), "explain.max_instances must be an int in [1, 4096]")
        check(self.inject_fault in (None, "error", "oom"), "explain.inject_fault must be null, error or oom")
        check(self.deadline_ms is None or is_int(self.deadline_ms, 1, MAX_DEADLINE_MS),
               f"explain.deadline_ms must be an int in [1, {MAX_DEADLINE_MS}] (milliseconds) or null")
        check(isinstance(self.cache_mb, (int, float)) and not isinstance(self.cache_mb, bool)
               and 0 <= self.cache_mb <= 1 << 20, "explain.cache_mb must be a number in [0, 1048576] (0: off)")
        check(is_int(self.async_batch_size, 1, 1024), "explain.async_batch_size must be an int in [1, 1024]")
        check(isinstance(self.async_max_batch_delay_ms, (int, float)) and not isinstance(self.async_max_batch_delay_ms, bool)
               and 0 <= self.async_max_batch_delay_ms <= 10_000,
               "explain.async_max_batch_delay_ms must be a number in [0, 10000] (milliseconds)")
        check(is_int(self.async_max_queued, 1, 1 << 20), "explain.async_max_queued must be an int in [1, 1048576]")
        check(is_int(self.cache_entries, 0, 1 << 24), "explain.cache_entries must be an int in [0, 16777216] (0: off)")
        check(self.request_overrides is None or (isinstance(self.request_overrides, (list, tuple))
               and set(self.request_overrides) <= set(self.override_fields)),
               f"explain.request_overrides must be a list drawn from {list(self.override_fields)}")

    def allows_override(self, name: str) -> bool:
        return self.request_overrides is None or name in self.request_overrides


@dataclass(frozen=True)
class ImageModelSettings:
    """The ``handler:`` section of an image model: how to load and preprocess.

    The model (``tsexplain.serving.models``): ``architecture`` names a torchvision
    classifier builder (``resnet18``), ``timm`` a timm model (``resnet18``), each built
    with ``num_classes`` outputs and ``model_kwargs`` (``{img_size: 64}``), the MAR's
    serialized state dict loaded into it; ``model_path`` is the folder of a Hugging Face
    image classifier inside the MAR. With none of them, TorchServe's conventions apply:
    a model file's one class and a state dict, or a TorchScript file.
    ``interpolation``: the resize filter (``bilinear``, ``bicubic``, ``nearest``).
    """

    section = "handler"
    architecture: Optional[str] = None
    timm: Optional[str] = None
    model_path: Optional[str] = None
    num_classes: Optional[int] = None
    model_kwargs: Optional[dict] = None
    resize: Any = 256
    crop: Any = 224
    interpolation: str = "bilinear"
    mean: list = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list = field(default_factory=lambda: list(IMAGENET_STD))
    top_k: int = 5
    max_image_pixels: int = 40_000_000

    def __post_init__(self):
        for name in ("architecture", "timm", "model_path"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, str) and value), f"handler.{name} must be a non-empty string")
        check(self.num_classes is None or is_int(self.num_classes, 1, 1_000_000), "handler.num_classes must be a positive int")
        check(self.model_kwargs is None or (isinstance(self.model_kwargs, dict)
               and all(isinstance(k, str) for k in self.model_kwargs)),
               "handler.model_kwargs must be a mapping of keyword arguments")
        check(self.interpolation in INTERPOLATIONS, f"handler.interpolation must be one of {list(INTERPOLATIONS)}")
        check(self.resize is None or is_size(self.resize), "handler.resize must be a positive int, [h, w] or null")
        check(self.crop is None or is_size(self.crop), "handler.crop must be a positive int, [h, w] or null")
        check(self.crop is not None or isinstance(self.resize, (list, tuple)),
               "handler: batching needs a fixed input size: set crop, or resize to [h, w]")
        for name in ("mean", "std"):
            value = getattr(self, name)
            check(
                isinstance(value, (list, tuple)) and len(value) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
                f"handler.{name} must be three numbers",
            )
        check(all(v > 0 for v in self.std), "handler.std values must be positive")
        check(is_int(self.top_k, 1, MAX_TOP_K), f"handler.top_k must be an int in [1, {MAX_TOP_K}]")
        check(is_int(self.max_image_pixels, 1, 1 << 34), "handler.max_image_pixels must be a positive int")

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(self.resize, self.crop, tuple(self.mean), tuple(self.std), self.interpolation)


@dataclass(frozen=True)
class ImageExplainSettings(ExplainAccessSettings):
    """The ``explain:`` section of an image model (and the access keys above).

    ``target_layer``: dotted module name; ``None`` finds it automatically.
    ``feature_layout``: how that layer lays out its output (``auto``: by family).
    ``methods``: the methods requests may use; ``method`` the default one.
    ``n_steps`` (at most ``max_n_steps`` per request) and ``internal_batch_size``
    apply to ``layer_ig`` and ``integrated_gradients``.
    ``heatmap_size`` and ``outputs`` are the defaults a request may override.
    ``heatmap_decimals`` rounds heatmap values in the JSON (compact responses).
    """

    modality = IMAGE
    override_fields = schema.override_fields(IMAGE)
    target_layer: Optional[str] = None
    feature_layout: str = "auto"
    method: str = "gradcam"
    methods: list = field(default_factory=lambda: list(CAM_METHODS))
    n_steps: int = 32
    max_n_steps: int = 128
    internal_batch_size: int = 32
    integration_method: str = "gausslegendre"
    heatmap_size: str = "feature"
    outputs: list = field(default_factory=lambda: ["heatmap"])
    heatmap_decimals: int = 3
    overlay_alpha: float = 0.6

    def __post_init__(self):
        super().__post_init__()
        check(self.target_layer is None or (isinstance(self.target_layer, str) and self.target_layer),
               "explain.target_layer must be a dotted module name")
        check(self.feature_layout in FEATURE_LAYOUTS, f"explain.feature_layout must be one of {list(FEATURE_LAYOUTS)}")
        check(isinstance(self.methods, (list, tuple)) and self.methods
               and all(isinstance(m, str) and m in IMAGE_METHODS for m in self.methods),
               f"explain.methods must be a non-empty list drawn from {list(IMAGE_METHODS)}")
        check(isinstance(self.method, str) and self.method in IMAGE_METHODS, f"explain.method must be one of {list(IMAGE_METHODS)}")
        check(self.method in self.methods, f"explain.method {self.method!r} is not in explain.methods {list(self.methods)}")
        check(is_int(self.max_n_steps, 1, MAX_N_STEPS[IMAGE]),
               f"explain.max_n_steps must be an int in [1, {MAX_N_STEPS[IMAGE]}]")
        check(is_int(self.n_steps, 1, self.max_n_steps), "explain.n_steps must be an int in [1, max_n_steps]")
        check(is_int(self.internal_batch_size, 1, 1 << 20), "explain.internal_batch_size must be a positive int")
        check(self.integration_method in INTEGRATION_METHODS,
               "explain.integration_method must be gausslegendre or a riemann_* rule")
        check(self.heatmap_size in HEATMAP_SIZES, f"explain.heatmap_size must be one of {list(HEATMAP_SIZES)}")
        check(isinstance(self.outputs, (list, tuple)) and set(self.outputs) <= set(IMAGE_OUTPUTS),
               f"explain.outputs must be a list drawn from {list(IMAGE_OUTPUTS)}")
        check(is_int(self.heatmap_decimals, 1, 8), "explain.heatmap_decimals must be an int in [1, 8]")
        check(isinstance(self.overlay_alpha, (int, float)) and 0 < self.overlay_alpha <= 1,
               "explain.overlay_alpha must be in (0, 1]")


@dataclass(frozen=True)
class TextModelSettings:
    """The ``handler:`` section of a text model.

    ``model_path``: the ``save_pretrained`` folder inside the MAR. ``max_length``:
    token budget per text (``None``: the tokenizer's, capped by the model's).
    ``top_k``: classes in a prediction (``None``: all).
    """

    section = "handler"
    model_path: str = "hf_model"
    max_length: Optional[int] = None
    top_k: Optional[int] = None
    max_text_chars: int = 100_000

    def __post_init__(self):
        check(isinstance(self.model_path, str) and self.model_path, "handler.model_path must be a folder name")
        check(self.max_length is None or is_int(self.max_length, 2, 1 << 20), "handler.max_length must be an int >= 2")
        check(self.top_k is None or is_int(self.top_k, 1, MAX_TOP_K), f"handler.top_k must be an int in [1, {MAX_TOP_K}]")
        check(is_int(self.max_text_chars, 1, 1 << 30), "handler.max_text_chars must be a positive int")


DEFAULT_ADAPTIVE_MAX = 256  # text explain.adaptive_max when left out (capped by max_n_steps)


@dataclass(frozen=True)
class TextExplainSettings(ExplainAccessSettings):
    """The ``explain:`` section of a text model.

    ``method``: the default method, one of ``methods``, the methods a request may
    choose (``layer_ig``, ``grad_x_input``, ``occlusion``; default all: each one's
    cost is bounded, by ``max_n_steps`` for Layer IG and ``occlusion_max_words``
    for occlusion, and grad x input costs one backward pass).
    ``layer``: dotted module name; ``None``: the family's measured default
    (``tsexplain.attr.text.families``), else ``get_input_embeddings()``. ``baseline``:
    ``auto`` (the family's: MASK for ModernBERT, else PAD), ``pad``, ``unk`` or ``mask``.
    ``n_steps`` is the default (``auto``, the default: adaptive, from ``adaptive_start``
    doubling up to ``adaptive_max`` (left out: 256, capped by ``max_n_steps``) until the relative delta is at most
    ``max_relative_delta``, within the request's deadline); a request may ask for up to
    ``max_n_steps``. ``converged`` in an answer is judged against ``max_relative_delta``.
    ``precision``: ``fp32`` | ``bf16`` | ``fp16`` (CUDA only) | ``auto``.
    ``internal_batch_size``: rows per pass, or ``auto`` from ``memory_budget_mb``.
    """

    modality = TEXT
    override_fields = schema.override_fields(TEXT)
    method: str = "layer_ig"
    methods: list = field(default_factory=lambda: list(TEXT_METHODS))
    layer: Optional[str] = None
    baseline: str = "auto"
    n_steps: Any = "auto"
    max_n_steps: int = 256
    integration_method: str = "gausslegendre"
    internal_batch_size: Any = 64
    top_k_words: int = 5
    html: bool = False
    precision: str = "fp32"
    memory_budget_mb: float = 1024
    adaptive_start: int = 8
    adaptive_max: Optional[int] = None  # None: DEFAULT_ADAPTIVE_MAX, capped by max_n_steps
    max_relative_delta: float = 0.05
    occlusion_max_words: int = 256

    @property
    def adaptive_top(self) -> int:
        """The adaptive schedule's largest step count: ``adaptive_max``, or when it is left out
        :data:`DEFAULT_ADAPTIVE_MAX` capped by ``max_n_steps`` (so that a configuration that only
        lowers ``max_n_steps`` keeps working with the default adaptive steps)."""
        return min(DEFAULT_ADAPTIVE_MAX, self.max_n_steps) if self.adaptive_max is None else self.adaptive_max

    def __post_init__(self):
        super().__post_init__()
        check(isinstance(self.methods, (list, tuple)) and self.methods and set(self.methods) <= set(TEXT_METHODS),
               f"explain.methods must be a non-empty list drawn from {list(TEXT_METHODS)}")
        check(self.method in self.methods, f"explain.method {self.method!r} must be one of explain.methods {list(self.methods)}")
        check(self.layer is None or (isinstance(self.layer, str) and self.layer), "explain.layer must be a dotted module name")
        check(self.baseline in BASELINES, f"explain.baseline must be one of {list(BASELINES)}")
        check(is_int(self.max_n_steps, 1, MAX_N_STEPS[TEXT]),
               f"explain.max_n_steps must be an int in [1, {MAX_N_STEPS[TEXT]}]")
        check(self.n_steps == "auto" or is_int(self.n_steps, 1, self.max_n_steps),
               "explain.n_steps must be an int in [1, max_n_steps] or auto")
        check(self.adaptive_max is None or is_int(self.adaptive_max, 1, 1024),
               "explain.adaptive_max must be an int in [1, 1024]")
        check(self.n_steps != "auto" or self.adaptive_max is None or self.adaptive_max <= self.max_n_steps,
               "explain.adaptive_max must not exceed max_n_steps when n_steps is auto")
        check(is_int(self.adaptive_start, 1, self.adaptive_top),
               f"explain.adaptive_start must be an int in [1, adaptive_max] (adaptive_max here: {self.adaptive_top})")
        check(isinstance(self.max_relative_delta, (int, float)) and not isinstance(self.max_relative_delta, bool)
               and 0 < self.max_relative_delta < float("inf"), "explain.max_relative_delta must be a positive number")
        check(self.precision in PRECISIONS, f"explain.precision must be one of {list(PRECISIONS)}")
        check(isinstance(self.memory_budget_mb, (int, float)) and not isinstance(self.memory_budget_mb, bool)
               and 0 < self.memory_budget_mb <= 1 << 24, "explain.memory_budget_mb must be a positive number")
        check(self.integration_method in INTEGRATION_METHODS,
               f"explain.integration_method must be one of {list(INTEGRATION_METHODS)}")
        check(self.internal_batch_size == "auto" or is_int(self.internal_batch_size, 1, 1 << 20),
               "explain.internal_batch_size must be a positive int or auto")
        check(is_int(self.top_k_words, 1, MAX_TOP_K), f"explain.top_k_words must be an int in [1, {MAX_TOP_K}]")
        check(isinstance(self.html, bool), "explain.html must be true or false")
        check(is_int(self.occlusion_max_words, 1, 1 << 20), "explain.occlusion_max_words must be a positive int")


SECTIONS = {IMAGE: (ImageModelSettings, ImageExplainSettings), TEXT: (TextModelSettings, TextExplainSettings)}


@dataclass(frozen=True)
class ModelSettings:
    """A model's settings, read once at load: its ``handler:`` and ``explain:`` sections."""

    handler: Any
    explain: Any

    @property
    def modality(self) -> str:
        return self.explain.modality

    def limits(self) -> Limits:
        """The bounds these settings put on requests (schema.parse)."""
        return Limits(self.explain.max_n_steps, getattr(self.handler, "max_text_chars", 0))

    def by_key(self) -> dict[str, Any]:
        """Every setting by dotted key (``"explain.n_steps"``), where request defaults come from."""
        return {f"{section.section}.{f.name}": getattr(section, f.name)
                for section in (self.handler, self.explain) for f in dataclasses.fields(section)}


def load_settings(modality: str, config: Optional[Mapping[str, Any]], model_name: str,
                  environ: Mapping[str, str]) -> ModelSettings:
    """A ``modality`` model's settings from its model config YAML (the whole mapping)
    and the environment; raises ``ConfigError`` for unknown keys and bad values."""
    config = config or {}
    handler_cls, explain_cls = SECTIONS[modality]
    explain = load_section(explain_cls, config.get("explain"), model_name, environ)
    # explain.audit, with its own keys' overrides: TSEXPLAIN_<MODEL>_AUDIT_<KEY>, then TSEXPLAIN_AUDIT_<KEY>
    audit = AuditSettings.load(explain.audit, model_name, environ)
    return ModelSettings(load_section(handler_cls, config.get("handler"), model_name, environ),
                         dataclasses.replace(explain, audit=audit))
