"""TextExplainer in process: methods chosen per request, allowed per model, and contrast."""

import numpy as np
import pytest

from harness import EXPLAIN, InProcessHandler, build_text_mar, unpack
from tsexplain.attr.text.grad_x_input import GradXInputTextExplainer
from tsexplain.attr.text.occlusion import OcclusionTextExplainer

LABELS = ("negative", "neutral", "positive")
TEXT = "the staff were unbelievably rude"


def make_handler(tmp, name, explain):
    mar = build_text_mar(tmp, name, "bert", config={"explain": explain}, labels=LABELS)
    return InProcessHandler(unpack(mar, tmp / f"{name}-unpacked"), "text_explainer", "TextExplainer")


@pytest.fixture(scope="module")
def handler(tmp_path_factory):
    return make_handler(tmp_path_factory.mktemp("all_methods"), "all",
                        {"n_steps": 16, "occlusion_max_words": 8})  # fmt: skip


@pytest.fixture(scope="module")
def restricted(tmp_path_factory):
    return make_handler(tmp_path_factory.mktemp("restricted"), "restricted",
                        {"methods": ["layer_ig", "occlusion"], "method": "occlusion"})  # fmt: skip


def attributions(body, key="tokens"):
    return [t["attribution"] for t in body["explanation"][key]]


def served_by_method(metrics):
    """Method dimension of every ExplanationsServed counter recorded so far."""
    return [args[3][0].value for name, args, _ in metrics.calls if name == "add_counter" and args[0] == "ExplanationsServed"]


def test_each_method_contract_and_values(handler):
    model, tokenizer = handler.handler.model, handler.handler.runner.tokenizer
    core = {"grad_x_input": GradXInputTextExplainer(model, tokenizer),
            "occlusion": OcclusionTextExplainer(model, tokenizer)}  # fmt: skip
    for method in ("layer_ig", "grad_x_input", "occlusion"):
        [(status, body)] = handler([({"data": TEXT, "target": "positive", "method": method}, EXPLAIN)])
        assert status == 200, body
        e = body["explanation"]
        assert e["method"] == method and e["target"] == {"index": 2, "label": "positive"} and e["contrast"] is None
        assert " ".join(w["word"] for w in e["words"]) == TEXT
        assert e["layer"] == "bert.embeddings.word_embeddings"
        if method == "layer_ig":
            assert e["n_steps"] == 16 and e["integration"] == "gausslegendre" and e["convergence_delta"] is not None
        else:
            assert e["n_steps"] is None and e["integration"] is None and e["convergence_delta"] is None
            want = core[method].explain([TEXT], [2])[0]
            np.testing.assert_allclose(attributions(body, "words"), [w.attribution for w in want.words], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["layer_ig", "grad_x_input", "occlusion"])
def test_contrast_is_the_difference_of_the_two_classes(handler, method):
    [(s1, target), (s2, contrast), (s3, both)] = handler([
        ({"data": TEXT, "target": "positive", "method": method}, EXPLAIN),
        ({"data": TEXT, "target": 0, "method": method}, EXPLAIN),
        ({"data": TEXT, "target": "positive", "contrast": "negative", "method": method}, EXPLAIN),
    ])
    assert (s1, s2, s3) == (200, 200, 200)
    assert both["explanation"]["contrast"] == {"index": 0, "label": "negative"}
    difference = np.subtract(attributions(target, "words"), attributions(contrast, "words"))
    np.testing.assert_allclose(attributions(both, "words"), difference, rtol=1e-4, atol=1e-4 * np.abs(difference).max())


def test_mixed_methods_in_one_batch_answer_as_alone_and_count_by_method(handler):
    requests = [
        ({"data": TEXT, "method": "occlusion", "target": 1}, EXPLAIN),
        ({"data": "good food", "method": "grad_x_input", "contrast": "neutral", "target": 2}, EXPLAIN),
        ({"data": TEXT, "target": 1}, EXPLAIN),  # the default method
        ({"data": "good food", "method": "occlusion", "target": 0}, EXPLAIN),
        (TEXT.encode(), {}),
    ]
    alone = [handler([request])[0] for request in requests[:4]]
    before = len(served_by_method(handler.metrics))
    batch = handler(requests)
    assert [s for s, _ in batch] == [200] * 5
    assert served_by_method(handler.metrics)[before:] == ["occlusion", "grad_x_input", "layer_ig", "occlusion"]
    for (_, together), (_, single) in zip(batch, alone):
        assert together["explanation"]["method"] == single["explanation"]["method"]
        np.testing.assert_allclose(attributions(together), attributions(single), rtol=1e-4, atol=1e-6)


def test_method_and_contrast_errors(handler):
    out = handler([
        ({"data": TEXT, "method": "saliency"}, EXPLAIN),
        ({"data": TEXT, "target": 2, "contrast": "angry"}, EXPLAIN),
        ({"data": TEXT, "target": 2, "contrast": 7}, EXPLAIN),
        ({"data": TEXT, "target": 2, "contrast": "positive"}, EXPLAIN),
        ({"data": TEXT, "contrast": 1.5}, EXPLAIN),
        ({"data": TEXT, "method": "occlusion", "target": 2}, EXPLAIN),
        ({"data": " ".join(["good"] * 9), "method": "occlusion"}, EXPLAIN),  # over occlusion_max_words
    ])
    assert [(s, b.get("type")) for s, b in out] == [
        (400, "unknown_method"), (400, "unknown_contrast"), (400, "unknown_contrast"), (400, "bad_contrast"),
        (400, "bad_contrast"), (200, None), (413, "too_many_words"),
    ]  # fmt: skip


def test_contrast_equal_to_the_predicted_class(handler):
    [(_, predicted)] = handler([(TEXT.encode(), {})])
    top = max(predicted, key=predicted.get)
    [(status, body), (ok, _)] = handler([({"data": TEXT, "contrast": top}, EXPLAIN), ({"data": TEXT}, EXPLAIN)])
    assert status == 400 and body["type"] == "bad_contrast" and ok == 200


def test_methods_allowed_per_model(restricted):
    out = restricted([
        ({"data": TEXT}, EXPLAIN),
        ({"data": TEXT, "method": "grad_x_input"}, EXPLAIN),
        ({"data": TEXT, "method": "layer_ig", "n_steps": 4}, EXPLAIN),
        ({"data": TEXT, "method": "grad_x_input"}, {}),  # a prediction: still checked, still refused
    ])
    assert [s for s, _ in out] == [200, 403, 200, 403]
    assert out[0][1]["explanation"]["method"] == "occlusion"
    assert out[1][1]["type"] == "method_not_allowed"
    assert out[2][1]["explanation"]["n_steps"] == 4
    assert set(restricted.handler.runner.explainers) == {"layer_ig", "occlusion"}
