"""The model-randomisation sanity check (tsexplain.tools.sanity): its parts against independent
computations, and its verdicts: Grad-CAM and Layer IG on the trained demo models (loaded from
their MARs as the worker loads them) PASS; explainers that ignore the weights (an edge detector
on the input image, word lengths for text) FAIL."""
import numpy as np
import pytest
import torch
import torchvision

from tiny_hf import tiny_classifier
from tsexplain.tools import eval_data, sanity
from tsexplain.tools.evaluate import main, run_sanity

SEED = 20261123


def brute_force_spearman(a, b):
    """Pearson correlation of average ranks, ranks counted pairwise (O(n^2))."""
    def ranks(x):
        x = np.asarray(x, dtype=float).ravel()
        return np.array([(x < v).sum() + ((x == v).sum() + 1) / 2 for v in x])
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def test_rankdata_and_spearman_match_a_brute_force_computation():
    assert sanity.rankdata([10, 20, 20, 5]).tolist() == [2, 3.5, 3.5, 1]
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 4, size=(3, 5)).astype(float)  # many ties, as Grad-CAM's zeros
        b = a + rng.normal(0, 1.5, size=a.shape)
        if np.ptp(a) > 0 and np.ptp(b) > 0:
            assert sanity.spearman(a, b) == pytest.approx(brute_force_spearman(a, b))
    assert sanity.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert sanity.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert sanity.spearman([1, 2, 3], [0, 0, 0]) == 0.0  # the ranking is gone
    assert sanity.spearman([0, 0, 0], [1, 2, 3]) is None  # nothing to compare with
    with pytest.raises(ValueError):
        sanity.spearman([1, 2], [1, 2, 3])


def test_blocks_run_from_the_output_down():
    model = torchvision.models.resnet18(num_classes=3).eval()
    blocks = sanity.cascade_blocks(model, lambda: model(torch.zeros(1, 3, 32, 32)))
    assert [b.name for b in blocks] == ["fc", "layer4", "layer3", "layer2", "layer1", "bn1", "conv1"]
    assert "layer4.0.downsample.0" in blocks[1].modules and "layer4.1.bn2" in blocks[1].modules
    text_model, tokenizer = tiny_classifier("bert")
    blocks = sanity.cascade_blocks(text_model, lambda: text_model(**tokenizer(["a b"], return_tensors="pt")))
    names = [b.name for b in blocks]
    assert names[0] == "classifier" and names[-1] == "bert.embeddings.word_embeddings"
    layers = [n for n in names if n.startswith("bert.encoder.layer.")]
    assert layers == sorted(layers, reverse=True) and len(layers) == text_model.config.num_hidden_layers
    assert sanity.block_name("encoder.layers.encoder_layer_3.ln_1") == "encoder.layers.encoder_layer_3"
    assert sanity.block_name("features.denseblock2.denselayer1.conv1") == "features.denseblock2"


def test_randomising_a_block_is_seeded_and_touches_that_block_only():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    with torch.no_grad():
        model.layer4[0].bn1.running_mean.fill_(3.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    [fc, layer4] = sanity.cascade_blocks(model, lambda: model(torch.zeros(1, 3, 32, 32)))[:2]
    sanity.randomise_block(model, layer4, seed=5)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("layer4.") for k in changed)
    assert torch.equal(after["layer4.0.bn1.running_mean"], torch.zeros(512))  # batch-norm statistics reset too
    again = torchvision.models.resnet18(num_classes=3).eval()
    again.load_state_dict(before)
    sanity.randomise_block(again, layer4, seed=5)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in after.items())  # same seed, same weights
    sanity.randomise_block(again, layer4, seed=6)
    assert not torch.equal(again.layer4[0].conv1.weight, after["layer4.0.conv1.weight"])


def test_the_weights_come_back_even_when_an_explanation_fails():
    model = torchvision.models.resnet18(num_classes=3).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = sanity.cascade_blocks(model, lambda: model(torch.zeros(1, 3, 32, 32)))
    calls = []

    def explain():
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("boom")
        return [np.arange(4.0)]

    with pytest.raises(RuntimeError):
        sanity.sanity_check(model, explain, blocks)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_the_verdict_rule():
    stage = lambda mean: {"mean": mean}  # noqa: E731
    assert sanity.verdict([stage(1.0), stage(0.6), stage(0.1)])[0] == "pass"
    assert sanity.verdict([stage(1.0), stage(0.2), stage(0.7)])[0] == "fail"  # still correlated at the end
    assert sanity.verdict([stage(0.55), stage(0.3), stage(0.4)])[0] == "fail"  # fell by less than the threshold
    assert sanity.verdict([stage(None), stage(None)])[0] == "fail"


# ------------------------------------------------------------- on the trained demo models

@pytest.fixture(scope="module")
def shapes(demo_store):
    from tsexplain.tools.eval_mar import MarImage

    backend = MarImage(demo_store / "shapes.mar", batch_size=16)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def shape_frames(shapes):
    return eval_data.frames(eval_data.synthetic_images(8, SEED, 64, shapes.preprocessing))


def sobel_edges(frame: np.ndarray, cells: int = 8) -> np.ndarray:
    """Gradient magnitude of the grey image, averaged over ``cells`` x ``cells`` blocks: a map of
    the input alone."""
    grey = frame.astype(float).mean(axis=2)
    gy, gx = np.gradient(grey)
    magnitude = np.hypot(gx, gy)
    h, w = magnitude.shape
    return magnitude[: h // cells * cells, : w // cells * cells].reshape(cells, h // cells, cells, w // cells).mean((1, 3))


def test_gradcam_on_the_trained_shapes_model_passes(shapes, shape_frames):
    before = shapes.predict_proba(shape_frames)
    result = run_sanity(shapes, "image", shape_frames, "gradcam", seed=SEED)
    stages = result["stages"]
    print([(s["block"], round(s["mean"], 3), round(s["std"], 3)) for s in stages])
    assert result["verdict"] == "pass", result["reason"]
    assert [s["block"] for s in stages[1:]] == ["fc", "layer4", "layer3", "layer2", "layer1", "bn1", "conv1"]
    assert stages[0]["mean"] == pytest.approx(1.0)  # Grad-CAM is deterministic
    assert stages[-1]["mean"] <= 0.5 and stages[-1]["n"] == 8
    assert np.allclose(shapes.predict_proba(shape_frames), before)  # the weights were restored


def test_an_edge_detector_ignoring_the_weights_fails(shapes, shape_frames):
    blocks = sanity.cascade_blocks(shapes.model, lambda: shapes.run_forward(shape_frames[0]))
    weights_seen = []

    def edges():
        weights_seen.append(sum(float(p.detach().double().sum()) for p in shapes.model.parameters()))
        return [sobel_edges(f) for f in shape_frames]

    result = sanity.sanity_check(shapes.model, edges, blocks, seed=SEED)
    assert len(set(weights_seen[1:])) == len(blocks) + 1  # the model did change under it at every stage
    assert result["verdict"] == "fail" and "do not depend on the weights" in result["reason"]
    assert all(s["mean"] == pytest.approx(1.0) for s in result["stages"])


@pytest.fixture(scope="module")
def reviews(demo_store):
    from tsexplain.tools.eval_mar import MarText

    backend = MarText(demo_store / "reviews.mar", batch_size=16)
    yield backend
    backend.close()


def test_layer_ig_on_the_trained_reviews_model_passes_and_word_lengths_fail(reviews):
    texts = [s.text for s in eval_data.synthetic_texts(4, SEED)]
    result = run_sanity(reviews, "text", texts, "layer_ig", seed=SEED)
    print([(s["block"], round(s["mean"], 3)) for s in result["stages"]])
    assert result["verdict"] == "pass", result["reason"]
    assert result["stages"][0]["mean"] == pytest.approx(1.0) and result["stages"][-1]["mean"] <= 0.5
    assert result["stages"][-1]["block"] == "bert.embeddings.word_embeddings"

    blocks = [sanity.Block(b["name"], tuple(b["modules"])) for b in result["blocks"]]
    words = [e.words for e in reviews.explain(texts, "layer_ig")]
    lengths = lambda: [np.array([len(w["word"]) for w in ws], dtype=float) for ws in words]  # noqa: E731
    broken = sanity.sanity_check(reviews.model, lengths, blocks, seed=SEED)
    assert broken["verdict"] == "fail"


def test_the_sanity_check_is_refused_against_a_server(capsys):
    assert main(["image", "--url", "http://127.0.0.1:9", "--model", "m", "--sanity"]) == 2
    assert "a server does not expose" in capsys.readouterr().err
