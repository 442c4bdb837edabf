"""TextExplainer in process, from MARs of tiny Hugging Face models the tests make."""

import numpy as np
import pytest
import torch
from captum.attr import LayerIntegratedGradients

from harness import EXPLAIN, InProcessHandler, build_mar, build_text_mar, unpack

LABELS = ("negative", "neutral", "positive")


@pytest.fixture(scope="module")
def handler(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("text_mar")
    mar = build_text_mar(tmp, "tiny", "bert", config={"explain": {"n_steps": 32, "max_n_steps": 64}}, labels=LABELS)
    return InProcessHandler(unpack(mar, tmp / "unpacked"), "text_explainer", "TextExplainer")


def test_predictions_are_label_probabilities(handler):
    [(status, body)] = handler([("the plot was great".encode(), {})])
    assert status == 200 and set(body) == set(LABELS)
    assert abs(sum(body.values()) - 1) < 1e-5


def test_explanation_contract_and_captum_parity(handler):
    text = "the staff were unbelievably rude"
    [(status, body)] = handler([({"data": text, "target": "positive", "html": True}, EXPLAIN)])
    assert status == 200
    e = body["explanation"]
    assert e["method"] == "layer_ig" and e["n_steps"] == 32 and e["truncated"] is False
    assert e["integration"] == "gausslegendre"
    assert e["target"] == {"index": 2, "label": "positive"}
    assert set(e["convergence_delta"]) == {"absolute", "relative"}
    assert all(0 <= t["start"] < t["end"] <= len(text) for t in e["tokens"])
    assert " ".join(w["word"] for w in e["words"]) == text
    assert "<span" in e["html"]
    # Independent captum computation on the handler's own model and tokenizer.
    model, tokenizer = handler.handler.model, handler.handler.runner.tokenizer
    enc = tokenizer([text], return_tensors="pt")
    ids = enc["input_ids"]
    special = torch.tensor(tokenizer.get_special_tokens_mask(ids[0].tolist(), already_has_special_tokens=True)).bool()
    baseline = ids.masked_fill(~special[None], tokenizer.pad_token_id)

    def forward(input_ids, attention_mask, token_type_ids):
        return model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    lig = LayerIntegratedGradients(forward, model.get_input_embeddings())
    token_type_ids = enc.get("token_type_ids", torch.zeros_like(ids))
    attributions = lig.attribute(ids, baseline, target=2, n_steps=32, method="gausslegendre",
                                 additional_forward_args=(enc["attention_mask"], token_type_ids))
    expected = attributions.sum(-1)[0][~special].tolist()
    got = [t["attribution"] for t in e["tokens"]]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_n_steps_override_and_bounds(handler):
    [(ok, body), (too_many, error)] = handler([
        ({"data": "fine food", "n_steps": 8}, EXPLAIN),
        ({"data": "fine food", "n_steps": 65}, EXPLAIN),
    ])
    assert ok == 200 and body["explanation"]["n_steps"] == 8
    assert too_many == 400 and error["type"] == "bad_n_steps"


def test_mixed_batch_answers_each_request_alone(handler):
    texts = ["good service", "the soup was cold and the waiter never came back"]
    alone = [handler([({"data": t, "target": 0}, EXPLAIN)])[0] for t in texts]
    batch = handler([
        ({"data": texts[0], "target": 0}, EXPLAIN),
        ("   \n ".encode(), EXPLAIN),
        (b"\xff\xfe not utf-8", {}),
        (texts[1].encode(), {}),
        ({"data": texts[1], "target": 0}, EXPLAIN),
        ({"data": texts[1], "target": "angry"}, EXPLAIN),
    ])
    assert [s for s, _ in batch] == [200, 400, 400, 200, 200, 400]
    assert [batch[i][1]["type"] for i in (1, 2, 5)] == ["empty_text", "bad_encoding", "unknown_target"]
    for (_, together), (_, single) in zip([batch[0], batch[4]], alone):
        np.testing.assert_allclose([t["attribution"] for t in together["explanation"]["tokens"]],
                                   [t["attribution"] for t in single["explanation"]["tokens"]], rtol=1e-4, atol=1e-6)


def test_truncation_flag_and_unicode(handler):
    long_text = " ".join(["service"] * 500)
    [(status, body)] = handler([(long_text.encode(), EXPLAIN)])
    assert status == 200 and body["explanation"]["truncated"] is True
    text = "naïve café 😀 服务很好 שלום"
    [(status, body)] = handler([({"data": text}, EXPLAIN)])
    assert status == 200
    for word in body["explanation"]["words"]:
        assert text[word["start"]:word["end"]] == word["word"]


def test_leaves_nothing_behind(handler):
    model = handler.handler.model
    handler([("nice".encode(), EXPLAIN)])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert not model.training and torch.is_grad_enabled()


def test_explanation_failure_is_503_for_that_request_only(handler, monkeypatch):
    monkeypatch.setattr(handler.handler.runner.explainers["layer_ig"], "explain", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    out = handler([("ok".encode(), EXPLAIN), ("ok".encode(), {})])
    assert out[0][0] == 503 and out[0][1]["type"] == "explanation_failed"
    assert out[1][0] == 200


SPEED_TEXTS = ["the movie was unbelievably good , i loved it", "bad film"]


def test_handler_serves_the_speed_settings(tmp_path):
    config = {"explain": {"n_steps": "auto", "adaptive_start": 2, "adaptive_max": 32, "max_relative_delta": 0.01,
                          "internal_batch_size": "auto", "memory_budget_mb": 64, "precision": "bf16"}}
    mar = build_text_mar(tmp_path, "fast", "bert", config=config)
    handler = InProcessHandler(unpack(mar, tmp_path / "unpacked"), "text_explainer", "TextExplainer")
    explainer = handler.handler.runner.explainers["layer_ig"]
    assert explainer.precision == "bf16" and explainer.activation_cost is not None
    out = handler([({"data": SPEED_TEXTS[0]}, EXPLAIN), ({"data": SPEED_TEXTS[1], "n_steps": 8}, EXPLAIN)])
    adaptive, fixed = out[0][1]["explanation"], out[1][1]["explanation"]
    assert adaptive["precision"] == "bf16" and adaptive["converged"] in (True, False)
    assert adaptive["n_steps"] in (2, 4, 8, 16, 32)
    assert adaptive["converged"] == (adaptive["convergence_delta"]["relative"] <= 0.01)
    assert fixed["n_steps"] == 8 and fixed["converged"] == (fixed["convergence_delta"]["relative"] <= 0.01)


def test_defaults_apply_through_the_handler(tmp_path):
    """A MAR without explain settings, of a small trained RoBERTa: the family's layer, adaptive steps,
    ``converged`` a bool judged against the default bound, and the same answer as the explainer's
    defaults called directly."""
    import yaml

    from trained_hf import CACHE, heldout, trained_classifier
    from tsexplain.attr.text.lig import LayerIGTextExplainer

    model, tokenizer = trained_classifier("roberta")  # trained once per machine, cached under build/
    config = tmp_path / "empty.yaml"
    config.write_text(yaml.safe_dump({}))
    build_mar.main(["text", "--name", "roberta", "--model-dir", str(CACHE / "roberta"), "--config", str(config),
                    "--export-path", str(tmp_path / "store")])
    handler = InProcessHandler(unpack(tmp_path / "store" / "roberta.mar", tmp_path / "unpacked"),
                               "text_explainer", "TextExplainer")
    texts = [s.text for s in heldout(6)]
    out = handler([({"data": text}, EXPLAIN) for text in texts] + [({"data": texts[0], "n_steps": 2}, EXPLAIN)])
    assert [status for status, _ in out] == [200] * 7
    direct = LayerIGTextExplainer(model, tokenizer).explain(texts, [body["predictions"][0]["index"] for _, body in out[:6]])
    for (_, body), expected in zip(out[:6], direct):
        e = body["explanation"]
        assert e["layer"] == "roberta.embeddings" and e["integration"] == "gausslegendre"
        assert e["converged"] is (e["convergence_delta"]["relative"] <= 0.05)
        assert e["n_steps"] == expected.n_steps and e["n_steps"] in (8, 16, 32, 64, 128, 256)
        np.testing.assert_allclose([t["attribution"] for t in e["tokens"]],
                                   [t.attribution for t in expected.tokens], rtol=1e-4, atol=1e-6)
    assert sum(body["explanation"]["converged"] for _, body in out[:6]) >= 5
    coarse = out[6][1]["explanation"]  # a fixed n_steps asked for: judged against the same bound
    assert coarse["n_steps"] == 2 and coarse["converged"] is (coarse["convergence_delta"]["relative"] <= 0.05)
