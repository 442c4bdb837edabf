"""Tests of tsexplain.serving.concurrency: predictions that do not wait for explanations.

- shared_weights_copy: same parameter/buffer objects, new modules, hooks on the copy
  never reach the original, TypeError for modules it cannot copy.
- Isolation under captum's Layer IG: a prediction on the original model run in the
  middle of an explanation on the copy is undisturbed, deterministically (a hook) and
  from another thread; the same interleaving on the explained model itself is the
  control that shows the test can fail.
- MicroBatcher: batch sizes and order, the delay, the two lanes, Overloaded, errors.

CPU only, tiny models; every blocking Event is set in ``finally`` and every wait has a
timeout, so a bug fails a test instead of hanging it.
"""

import copy
import threading
import time

import pytest
import torch
import torchvision

from tiny_hf import tiny_classifier
from tsexplain.serving.concurrency import MicroBatcher, Overloaded, shared_weights_copy
from tsexplain.attr.text import make_text_explainer

TIMEOUT = 10  # seconds for any future or event; only reached when something is broken

EXPLAINED_TEXTS = ["the movie was good and the plot was believable", "bad film"]
TARGETS = [0, 2]
PREDICTED_TEXTS = ["a great film with a happy ending", "i did not like the boring parts of the film"]


# --- helpers ------------------------------------------------------------------------


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def no_hooks(model: torch.nn.Module) -> bool:
    return all(
        not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._forward_hooks_with_kwargs)
        for m in model.modules()
    )


def encode(tokenizer, texts):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def predict(model, encoded) -> torch.Tensor:
    """A plain prediction, as a handler runs it."""
    input_ids, attention_mask = encoded
    with torch.inference_mode():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits.clone()


def attributions(explanations) -> torch.Tensor:
    return torch.tensor([t.attribution for e in explanations for t in e.tokens], dtype=torch.float64)


def layer_ig(model, tokenizer):
    return make_text_explainer("layer_ig", model, tokenizer, n_steps=16, internal_batch_size=16)


def deliver_all(batch):
    for i, item in enumerate(batch.items):
        batch.deliver(i, ("answer", item))


# --- shared_weights_copy --------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=3).eval()


def test_copy_shares_every_parameter_and_buffer(resnet):
    view = shared_weights_copy(resnet)
    params, view_params = dict(resnet.named_parameters()), dict(view.named_parameters())
    buffers, view_buffers = dict(resnet.named_buffers()), dict(view.named_buffers())
    assert list(view_params) == list(params) and len(params) > 50
    assert list(view_buffers) == list(buffers) and len(buffers) > 50  # BatchNorm statistics
    for name, tensor in params.items():
        assert view_params[name] is tensor, name
    for name, tensor in buffers.items():
        assert view_buffers[name] is tensor, name


def test_copy_has_its_own_modules_and_same_outputs(resnet):
    view = shared_weights_copy(resnet)
    pairs = list(zip(resnet.named_modules(), view.named_modules()))
    assert len(pairs) == len(list(resnet.modules())) == len(list(view.modules()))
    for (name, module), (view_name, view_module) in pairs:
        assert name == view_name and type(module) is type(view_module)
        assert module is not view_module, name
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        assert torch.equal(view(x), resnet(x))


def test_hook_on_copy_does_not_fire_for_original(resnet):
    view = shared_weights_copy(resnet)
    fired = []
    handle = view.layer4.register_forward_hook(lambda module, args, out: fired.append(out.shape))
    try:
        assert no_hooks(resnet)
        x = torch.randn(1, 3, 64, 64)
        with torch.inference_mode():
            resnet(x)
            assert fired == []
            view(x)
        assert fired == [torch.Size([1, 512, 2, 2])]
    finally:
        handle.remove()
    assert no_hooks(resnet) and no_hooks(view)


class HoldsALock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)
        self.lock = threading.Lock()  # deepcopy cannot copy it

    def forward(self, x):
        return self.linear(x)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.linear(x)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("make", [HoldsALock, lambda: torch.jit.script(Tiny())], ids=["lock", "torchscript"])
def test_uncopyable_module_is_type_error(make):
    with pytest.raises(TypeError):
        shared_weights_copy(make())


# --- isolation under Layer IG ---------------------------------------------------------


@pytest.mark.parametrize("explain_on_copy", [True, False], ids=["copy", "original-control"])
def test_prediction_inside_layer_ig_explanation(explain_on_copy):
    model, tokenizer = tiny_classifier("bert", 0.35)
    explained_model = shared_weights_copy(model) if explain_on_copy else model
    explainer = layer_ig(explained_model, tokenizer)
    encoded = encode(tokenizer, PREDICTED_TEXTS)
    reference = predict(model, encoded)
    alone = attributions(explainer.explain(EXPLAINED_TEXTS, TARGETS, n_steps=16, top_k=3))

    record = {}

    def predict_once(module, args, output):
        # once, in a gradient pass of the path: captum's hook then replaces the embeddings' output
        if record or not torch.is_grad_enabled():
            return
        record["fired"] = True  # guard: with the control, the prediction below re-enters this hook
        try:
            record["logits"] = predict(model, encoded)
        except Exception as exc:  # noqa: BLE001 - the control may fail here
            record["error"] = exc

    handle = explained_model.classifier.register_forward_hook(predict_once)
    try:
        try:
            interleaved = attributions(explainer.explain(EXPLAINED_TEXTS, TARGETS, n_steps=16, top_k=3))
        except Exception:  # noqa: BLE001 - only the control may break its own explanation
            if explain_on_copy:
                raise
            interleaved = None
    finally:
        handle.remove()

    assert record.get("fired"), "the hook never ran during a gradient pass"
    if explain_on_copy:
        assert "error" not in record, record.get("error")
        assert torch.equal(record["logits"], reference)
        assert torch.allclose(interleaved, alone, rtol=0, atol=1e-6)
        assert no_hooks(model)
    else:
        disturbed = "error" in record or not torch.allclose(record["logits"], reference, rtol=0, atol=1e-6)
        assert disturbed, "the control prediction was not disturbed: this test could not fail"
    assert no_hooks(explained_model)


def test_predictions_in_a_thread_during_explanation_on_copy():
    model, tokenizer = tiny_classifier("bert", 0.35)
    view = shared_weights_copy(model)
    # the handler gives the explainer its own tokenizer too (fast tokenizers share padding state)
    explainer = layer_ig(view, copy.deepcopy(tokenizer))
    encoded = encode(tokenizer, PREDICTED_TEXTS)
    reference = predict(model, encoded)
    alone = attributions(explainer.explain(EXPLAINED_TEXTS, TARGETS, n_steps=128, top_k=3))

    started, ended, stop = threading.Event(), threading.Event(), threading.Event()
    first_prediction, predicted_during = threading.Event(), threading.Event()
    predictions, during, errors = [], [], []

    def prediction_loop():
        try:
            while not stop.is_set():
                began_inside = started.is_set() and not ended.is_set()
                predictions.append(predict(model, encoded))
                first_prediction.set()
                if began_inside and not ended.is_set():
                    during.append(1)
                    predicted_during.set()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    waited = []

    def wait_for_a_prediction(module, args, output):
        # once, mid-path: hold the explanation until a prediction has run inside it
        if not waited and torch.is_grad_enabled():
            waited.append(predicted_during.wait(TIMEOUT))

    handle = view.classifier.register_forward_hook(wait_for_a_prediction)
    thread = threading.Thread(target=prediction_loop, daemon=True)
    thread.start()
    try:
        assert first_prediction.wait(TIMEOUT)
        started.set()
        explained = attributions(explainer.explain(EXPLAINED_TEXTS, TARGETS, n_steps=128, top_k=3))
        ended.set()
    finally:
        ended.set()
        stop.set()
        handle.remove()
        thread.join(TIMEOUT)

    assert not thread.is_alive() and errors == []
    assert waited == [True]
    assert len(during) >= 1
    assert len(predictions) >= 2
    for logits in predictions:
        assert torch.allclose(logits, reference, rtol=0, atol=1e-6)
    assert torch.allclose(explained, alone, rtol=0, atol=1e-6)
    assert no_hooks(model) and no_hooks(view)


# --- MicroBatcher ---------------------------------------------------------------------


def test_batches_are_at_most_max_batch_size_in_submission_order():
    release_first = threading.Event()
    batches, lock = [], threading.Lock()

    def run_batch(batch):
        with lock:
            batches.append(list(batch.items))
        if batch.items[0] == "a":
            assert release_first.wait(TIMEOUT)
        deliver_all(batch)

    # a 30 s delay: only full batches can run within the test's timeouts
    batcher = MicroBatcher(run_batch, max_batch_size=3, max_delay_s=30, max_pending=100)
    try:
        first = [batcher.submit(item) for item in "abc"]
        wait_for(lambda: len(batches) == 1, "the first batch")
        later = [batcher.submit(i) for i in range(6)]
        time.sleep(0.1)
        assert len(batches) == 1, "a batch ran while the prediction lane was held"
        assert not any(f.done() for f in first + later)
    finally:
        release_first.set()
    assert [f.result(TIMEOUT) for f in first] == [("answer", item) for item in "abc"]
    assert [f.result(TIMEOUT) for f in later] == [("answer", i) for i in range(6)]
    assert batches == [["a", "b", "c"], [0, 1, 2], [3, 4, 5]]
    wait_for(lambda: batcher.in_worker == 0, "in_worker == 0")


def test_lone_item_waits_for_max_delay():
    ran_at = []

    def run_batch(batch):
        ran_at.append(time.monotonic())
        deliver_all(batch)

    batcher = MicroBatcher(run_batch, max_batch_size=4, max_delay_s=0.2, max_pending=10)
    submitted = time.monotonic()
    future = batcher.submit("x")
    assert future.result(TIMEOUT) == ("answer", "x")
    assert ran_at[0] - submitted >= 0.2 - 0.01  # lower bound only


def test_full_batch_does_not_wait_for_max_delay():
    batcher = MicroBatcher(deliver_all, max_batch_size=2, max_delay_s=30, max_pending=10)
    futures = [batcher.submit(1), batcher.submit(2)]
    # the 30 s delay would time these out
    assert [f.result(TIMEOUT) for f in futures] == [("answer", 1), ("answer", 2)]


def test_predictions_do_not_wait_for_explanations_which_take_turns():
    a_explaining, release_a, c_done = threading.Event(), threading.Event(), threading.Event()
    events, lock = [], threading.Lock()

    def record(event):
        with lock:
            events.append(event)

    def run_batch(batch):
        name = batch.items[0]
        batch.deliver(0, name)  # its prediction
        if name == "B":
            return
        record(f"{name} waits")
        batch.leave_prediction_lane()
        record(f"{name} enters")
        if name == "A":
            a_explaining.set()
            assert release_a.wait(TIMEOUT)
        record(f"{name} exits")
        if name == "C":
            c_done.set()

    batcher = MicroBatcher(run_batch, max_batch_size=1, max_delay_s=0, max_pending=10)
    try:
        assert batcher.submit("A").result(TIMEOUT) == "A"
        assert a_explaining.wait(TIMEOUT)
        assert batcher.submit("B").result(TIMEOUT) == "B"  # while A still explains
        assert batcher.submit("C").result(TIMEOUT) == "C"
        wait_for(lambda: "C waits" in events, "C to leave the prediction lane")
        time.sleep(0.1)
        assert events == ["A waits", "A enters", "C waits"], "C entered the explanation lane A holds"
    finally:
        release_a.set()
    assert c_done.wait(TIMEOUT)
    assert events == ["A waits", "A enters", "C waits", "A exits", "C enters", "C exits"]
    wait_for(lambda: batcher.in_worker == 0, "in_worker == 0")


def test_overloaded_past_max_pending():
    release = threading.Event()

    def run_batch(batch):
        assert release.wait(TIMEOUT)
        deliver_all(batch)

    batcher = MicroBatcher(run_batch, max_batch_size=2, max_delay_s=0, max_pending=2)
    try:
        futures = [batcher.submit(1), batcher.submit(2)]
        assert batcher.in_worker == 2
        with pytest.raises(Overloaded):
            batcher.submit(3)
        assert batcher.in_worker == 2
    finally:
        release.set()
    assert [f.result(TIMEOUT) for f in futures] == [("answer", 1), ("answer", 2)]
    wait_for(lambda: batcher.in_worker == 0, "in_worker == 0")
    again = batcher.submit(4)
    assert again.result(TIMEOUT) == ("answer", 4)
    wait_for(lambda: batcher.in_worker == 0, "in_worker == 0")


@pytest.mark.parametrize("leave_before_raising", [False, True], ids=["in-prediction-lane", "in-explanation-lane"])
def test_exception_reaches_unanswered_items_and_frees_both_lanes(leave_before_raising):
    error = ValueError("boom")

    def run_batch(batch):
        if batch.items[0] == "fail":
            batch.deliver(0, "kept")
            if leave_before_raising:
                batch.leave_prediction_lane()
            raise error
        batch.leave_prediction_lane()  # needs the explanation lane
        deliver_all(batch)

    batcher = MicroBatcher(run_batch, max_batch_size=3, max_delay_s=30, max_pending=10)
    failing = [batcher.submit(item) for item in ("fail", "x", "y")]
    assert failing[0].result(TIMEOUT) == "kept"
    for future in failing[1:]:
        with pytest.raises(ValueError) as caught:
            future.result(TIMEOUT)
        assert caught.value is error
    after = [batcher.submit(item) for item in ("p", "q", "r")]
    assert [f.result(TIMEOUT) for f in after] == [("answer", item) for item in "pqr"]
    wait_for(lambda: batcher.in_worker == 0 and not batcher.explanation_lane.locked(), "both lanes free")


def test_unanswered_item_gets_runtime_error():
    def run_batch(batch):
        batch.deliver(0, "only the first")

    batcher = MicroBatcher(run_batch, max_batch_size=2, max_delay_s=30, max_pending=10)
    answered, forgotten = batcher.submit(1), batcher.submit(2)
    assert answered.result(TIMEOUT) == "only the first"
    with pytest.raises(RuntimeError):
        forgotten.result(TIMEOUT)
    wait_for(lambda: batcher.in_worker == 0, "in_worker == 0")


@pytest.mark.parametrize(
    "settings",
    [
        {"max_batch_size": 0, "max_delay_s": 0.01, "max_pending": 1},
        {"max_batch_size": 1, "max_delay_s": 0.01, "max_pending": 0},
        {"max_batch_size": 1, "max_delay_s": -1, "max_pending": 1},
    ],
    ids=["max_batch_size=0", "max_pending=0", "negative-delay"],
)
def test_invalid_settings_are_value_error(settings):
    with pytest.raises(ValueError):
        MicroBatcher(deliver_all, **settings)


def test_cancelled_request_frees_its_place():
    # asyncio.wrap_future cancels the pending future when the awaiting coroutine is cancelled
    release = threading.Event()
    finished = []

    def run_batch(batch):
        assert release.wait(TIMEOUT)
        deliver_all(batch)
        finished.append(batch.items)

    batcher = MicroBatcher(run_batch, max_batch_size=1, max_delay_s=0, max_pending=2)
    try:
        first = batcher.submit(1)
        queued = batcher.submit(2)
        assert queued.cancel()
    finally:
        release.set()
    assert first.result(TIMEOUT) == ("answer", 1)
    wait_for(lambda: len(finished) == 2, "both batches")
    time.sleep(0.05)  # _close runs after run_batch returns
    assert batcher.in_worker == 0
