"""The model zoo, text: BERT, RoBERTa, DistilBERT and ModernBERT classifiers (tiny random
configs, offline tokenizers) packaged with ``build_mar.sh text`` as a user packages them,
served by one real TorchServe with their default settings, and checked against
independent computations: predictions against the model's own softmax, Layer IG against
captum's ``LayerIntegratedGradients`` at each family's documented default layer and baseline."""
import json

import numpy as np
import pytest
import torch
from captum.attr import LayerIntegratedGradients

import build_mar
from tiny_hf import tiny_classifier, wordpiece_tokenizer

pytestmark = pytest.mark.server
LABELS = ("negative", "neutral", "positive")
TEXT = "the movie was unbelievably good and the music was great"
N_STEPS = 32


def tiny_modernbert():
    """A ModernBERT classifier (alternating local and global attention) on the WordPiece tokenizer."""
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    tokenizer = wordpiece_tokenizer()
    specials = {name: getattr(tokenizer, f"{name}_token_id") for name in ("pad", "cls", "sep")}
    config = ModernBertConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=64, global_attn_every_n_layers=2, local_attention=16, num_labels=3,
        initializer_range=0.2, pad_token_id=specials["pad"], cls_token_id=specials["cls"],
        sep_token_id=specials["sep"], bos_token_id=specials["cls"], eos_token_id=specials["sep"])
    torch.manual_seed(0)
    return ModernBertForSequenceClassification(config).eval(), tokenizer


FAMILIES = {"bert": lambda: tiny_classifier("bert"), "roberta": lambda: tiny_classifier("roberta"),
            "distilbert": lambda: tiny_classifier("distilbert"), "modernbert": tiny_modernbert}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from tsexplain.tools.launcher import TorchServe

    tmp = tmp_path_factory.mktemp("zoo_text")
    models = {}
    for family, make in FAMILIES.items():
        model, tokenizer = make()
        model.config.id2label = dict(enumerate(LABELS))
        model.config.label2id = {label: i for i, label in enumerate(LABELS)}
        folder = tmp / family
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        build_mar.main(["text", "--name", family, "--model-dir", str(folder), "--export-path", str(tmp / "store")])
        models[family] = (model, tokenizer)
    server = TorchServe(tmp / "store", {family: f"{family}.mar" for family in FAMILIES}, tmp / "ts")
    with server:
        yield server, models


def post(server, route, model, payload):
    status, raw = server.request("POST", f"{server.inference_url}/{route}/{model}", json.dumps(payload).encode(),
                                 {"Content-Type": "application/json"})
    return status, json.loads(raw)


def captum_layer_ig(model, tokenizer, text, family, target, n_steps):
    """Per-token attributions of the content tokens by captum, at each family's documented default
    (tsexplain.attr.text.families, written out here): BERT and DistilBERT on the input embeddings from
    the PAD baseline; ModernBERT there from the MASK baseline; RoBERTa on the embeddings' output from
    its own padding (the PAD row at the padding position, the special tokens at their positions)."""
    enc = tokenizer([text], return_tensors="pt", return_special_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    content = enc["special_tokens_mask"][0] == 0
    filler = tokenizer.mask_token_id if family == "modernbert" else tokenizer.pad_token_id
    baseline = ids.masked_fill(content[None], filler)
    if family == "roberta":
        pad = tokenizer.pad_token_id
        positions = pad + 1 + torch.arange(ids.shape[1])[None]
        forward = lambda i, p, m: model(input_ids=i, position_ids=p, attention_mask=m).logits  # noqa: E731
        lig = LayerIntegratedGradients(forward, model.roberta.embeddings)
        inputs, baselines = (ids, positions), (baseline, positions.masked_fill(content[None], pad))
    else:
        forward = lambda i, m: model(input_ids=i, attention_mask=m).logits  # noqa: E731
        lig = LayerIntegratedGradients(forward, model.get_input_embeddings())
        inputs, baselines = ids, baseline
    attributions = lig.attribute(inputs, baselines=baselines, target=target, n_steps=n_steps,
                                 method="gausslegendre", additional_forward_args=(mask,))
    return attributions.sum(-1)[0][content]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_predictions_are_the_models(zoo, family):
    server, models = zoo
    model, tokenizer = models[family]
    status, body = post(server, "predictions", family, {"data": TEXT})
    assert status == 200
    with torch.no_grad():
        expected = torch.softmax(model(**tokenizer([TEXT], return_tensors="pt")).logits[0], dim=0)
    assert list(body) == [LABELS[i] for i in expected.argsort(descending=True).tolist()]
    np.testing.assert_allclose([body[label] for label in LABELS], expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layer_ig_by_default_equals_captum(zoo, family):
    server, models = zoo
    model, tokenizer = models[family]
    status, body = post(server, "explanations", family, {"data": TEXT, "n_steps": N_STEPS})
    assert status == 200, body
    explanation = body["explanation"]
    assert explanation["method"] == "layer_ig" and explanation["n_steps"] == N_STEPS
    target = explanation["target"]["index"]
    assert target == body["predictions"][0]["index"]
    expected = captum_layer_ig(model, tokenizer, TEXT, family, target, N_STEPS)
    got = torch.tensor([t["attribution"] for t in explanation["tokens"]], dtype=expected.dtype)
    assert len(got) == len(expected) and expected.abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
    words = " ".join(w["word"] for w in sorted(explanation["words"], key=lambda w: w["start"]))
    assert words == TEXT
