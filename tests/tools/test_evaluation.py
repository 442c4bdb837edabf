"""The evaluation math on constructed cases whose curves have closed forms."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from tsexplain.tools import evaluation as ev
from tiny_hf import tiny_classifier
from tsexplain.attr.names import TEXT_METHODS
from tsexplain.attr.text import make_text_explainer
from tsexplain.tools.eval_backends import InProcessText, ServedText

SIDE = 10
MASK = np.zeros((SIDE, SIDE), dtype=bool)
MASK[2:4, :] = True  # 20 pixels: a fraction f = 0.2 of the image
F = MASK.mean()


def mask_image():
    image = np.zeros((SIDE, SIDE, 3), dtype=np.uint8)
    image[MASK] = 255
    return image


def mask_model(batch):
    """p(class 0) = mean brightness of the mask pixels (red channel) in [0, 1]."""
    p = np.asarray(batch)[:, MASK, 0].mean(axis=1) / 255.0
    return np.stack([p, 1 - p], axis=1)


def test_auc_and_step_counts():
    assert ev.auc(np.linspace(0, 1, 11)) == pytest.approx(0.5)
    assert ev.auc(np.ones(5)) == pytest.approx(1.0)
    assert ev.auc([[1, 0], [0, 0]]).tolist() == [0.5, 0.0]
    assert ev.step_counts(100, 10).tolist() == list(range(0, 101, 10))
    assert ev.step_counts(10, 3).tolist() == [0, 3, 7, 10]
    with pytest.raises(ValueError):
        ev.step_counts(10, 0)


def test_pixel_order_is_most_salient_first_with_random_ties():
    saliency = np.zeros((SIDE, SIDE))
    saliency[5, 5], saliency[0, 9] = 2.0, 1.0
    order = ev.pixel_order(saliency, np.random.default_rng(0))
    assert sorted(order.tolist()) == list(range(SIDE * SIDE))
    assert order[:2].tolist() == [55, 9]
    assert order[2:].tolist() != sorted(order[2:].tolist())  # the zeros are not in raster order


def test_perturbation_path_replaces_pixels_in_order():
    start, end = np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 3), 9, np.uint8)
    path = ev.perturbation_path(start, end, np.array([3, 0, 1, 2]), steps=2)
    assert path.shape == (3, 2, 2, 3)
    assert (path[0] == 0).all() and (path[2] == 9).all()
    assert path[1, :, :, 0].tolist() == [[9, 0], [0, 9]]  # pixels 3 and 0 first


def test_deletion_auc_closed_form_for_perfect_inverted_and_random_maps():
    image = mask_image()
    substrate = ev.deletion_substrate(image)
    assert (substrate == round(255 * F)).all()  # the mean colour; p(all deleted) = f exactly
    # Perfect map: p(t) = 1 - (1 - f) t / f until t = f, then f.  AUC = f + f (1 - f) / 2.
    perfect = ev.image_curves([image], [MASK.astype(float)], [0], mask_model, steps=10)
    assert perfect.deletion[0] == pytest.approx([1, 0.6, 0.2] + [0.2] * 8)
    assert perfect.deletion_auc[0] == pytest.approx(F + F * (1 - F) / 2)
    # Inverted map: p stays 1 until t = 1 - f, then falls linearly to f.  AUC = 1 - f + f (1 + f) / 2.
    inverted = ev.image_curves([image], [1.0 - MASK], [0], mask_model, steps=10)
    assert inverted.deletion_auc[0] == pytest.approx(1 - F + F * (1 + F) / 2)
    # Random full-resolution maps: E p(t) = 1 - (1 - f) t, AUC = 1 - (1 - f) / 2 = 0.6.
    rand = ev.random_image_curves([image], [(SIDE, SIDE)], [0], mask_model, steps=10, repeats=300, seed=1)
    assert rand.deletion_auc[0] == pytest.approx(1 - (1 - F) / 2, abs=0.02)
    assert rand.deletion[0] == pytest.approx(1 - (1 - F) * np.linspace(0, 1, 11), abs=0.04)


def test_insertion_closed_form_from_the_blurred_start():
    image = mask_image()
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(SIDE / 8)))
    assert (ev.insertion_start(image) == blurred).all()
    p0 = blurred[MASK, 0].mean() / 255
    assert 0.05 < p0 < 0.95
    # 5 steps of 20 pixels: the whole mask comes back in the first step, then p = 1.
    curves = ev.image_curves([image], [MASK.astype(float)], [0], mask_model, steps=5)
    assert curves.insertion[0] == pytest.approx([p0, 1, 1, 1, 1, 1])
    assert curves.insertion_auc[0] == pytest.approx(0.2 * (p0 + 1) / 2 + 0.8)


def test_low_resolution_maps_are_upsampled_and_target_column_used():
    image = mask_image()
    coarse = np.zeros((5, 5))
    coarse[1, :] = 1.0  # rows 2-3 of the 10x10 image after bilinear upsampling
    # class 1 = 1 - p: deleting the mask raises it to 1 - f.
    curves = ev.image_curves([image], [coarse], [1], mask_model, steps=10)
    assert curves.deletion[0][:3] == pytest.approx([0, 0.4, 0.8])
    assert ev.upsample_map(coarse, SIDE, SIDE).argmax() // SIDE in (2, 3)


def test_batching_does_not_change_curves():
    images = [mask_image(), 255 - mask_image()]
    maps = [MASK.astype(float), np.random.default_rng(3).random((SIDE, SIDE))]
    calls = []

    def counting(batch):
        calls.append(len(batch))
        return mask_model(batch)

    one = ev.image_curves(images, maps, [0, 1], counting, steps=4, batch_size=3)
    assert max(calls) == 3 and sum(calls) == 2 * 2 * 5
    many = ev.image_curves(images, maps, [0, 1], mask_model, steps=4, batch_size=100)
    assert np.allclose(one.deletion, many.deletion) and np.allclose(one.insertion, many.insertion)


def test_pointing_hit_uses_the_upsampled_peak_of_signed_maps():
    heatmap = -np.ones((4, 4))
    heatmap[3, 0] = -0.5
    assert ev.pointing_hit(torch.tensor(heatmap), (0, 48, 16, 64), 64, 64)
    assert not ev.pointing_hit(heatmap, (48, 0, 64, 16), 64, 64)


# ------------------------------------------------------------------------------ text

TEXT = "good a good b good c"


def words_of(text, attributions):
    out, pos = [], 0
    for word, a in zip(text.split(), attributions):
        start = text.index(word, pos)
        out.append({"word": word, "start": start, "end": start + len(word), "attribution": a})
        pos = start + len(word)
    return out


def good_model(texts):
    """p(class 1) = 0.2 x the number of "good" words."""
    p = np.array([0.2 * t.split().count("good") for t in texts])
    return np.stack([1 - p, p], axis=1)


def test_remove_spans_and_deletion_texts():
    assert ev.remove_spans("not  great, really", [(0, 3), (12, 18)]) == "great,"
    words = words_of(TEXT, [1, 0, 1, 0, 1, 0])
    texts = ev.deletion_texts(TEXT, ev.word_ranking(words), 7)
    assert texts[:3] == [TEXT, "a good b good c", "a b good c"]
    assert texts[5] == "c" and texts[6:] == ["c", "c"]  # one word is always kept


def test_word_deletion_closed_form_signed_vs_abs_ranking():
    words = words_of(TEXT, [1.0, -3.0, 0.9, 0.1, 0.8, 0.0])
    signed = ev.word_deletion_curves([TEXT], [words], [1], good_model, max_words=4, by="signed")
    assert signed[0] == pytest.approx([0.6, 0.4, 0.2, 0.0, 0.0])
    by_abs = ev.word_deletion_curves([TEXT], [words], [1], good_model, max_words=4, by="abs")
    assert by_abs[0] == pytest.approx([0.6, 0.6, 0.4, 0.2, 0.0])  # "a" (-3) goes first
    # Random orders: E[goods left after k of 6 words] = 3 (1 - k / 6).
    rand = ev.random_word_deletion_curves([TEXT], [words], [1], good_model, max_words=4, repeats=400, seed=0)
    assert rand[0] == pytest.approx(0.6 * (1 - np.arange(5) / 6), abs=0.03)
    with pytest.raises(ValueError):
        ev.word_ranking(words, by="nope")


def test_top_k_hit_and_summary():
    words = words_of(TEXT, [0.1, -3.0, 0.9, 0.1, 0.2, 0.0])
    assert ev.top_k_hit(words, (7, 11), 2)       # the second "good"
    assert not ev.top_k_hit(words, (19, 20), 3)  # "c"
    s = ev.summarize([1.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == pytest.approx(np.sqrt(2)) and s["sem"] == pytest.approx(1.0)


def test_served_answers_become_probability_rows():
    served = ServedText("http://127.0.0.1:1", "m")
    served._learn_labels([{"index": 2, "label": "c"}, {"index": 0, "label": "a"}, {"index": 1, "label": "b"}])
    rows = served._probabilities([{"c": 0.5, "a": 0.2, "b": 0.3}, {"c": 0.7, "a": 0.1}])
    assert np.allclose(rows, [[0.2, 0.3, 0.5], [0.1, 0.2, 0.7]])  # "b" left out: the rest


EVAL_TEXTS = ["the movie was unbelievably good , i loved it", "bad film"]


@pytest.mark.parametrize("method", TEXT_METHODS)
def test_evaluation_backend_runs_every_method(tmp_path, method):
    model, tok = tiny_classifier("bert")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    backend = InProcessText(tmp_path)
    [explained] = backend.explain(EVAL_TEXTS[:1], method)
    want = make_text_explainer(method, model, tok).explain(EVAL_TEXTS[:1], [explained.target])[0]
    assert explained.method == method
    assert [w["attribution"] for w in explained.words] == pytest.approx([w.attribution for w in want.words], abs=1e-5)


# ----------------------------------------------------------------- regions: the model's view

def test_curves_perturb_only_the_region_and_count_its_pixels():
    """A frame 10 wide and 14 tall whose model input is rows 3..12 (a 10x10 crop): the
    closed forms of the full-image case hold for the region, and no pixel outside it changes."""
    frame = np.full((14, SIDE, 3), 77, dtype=np.uint8)
    region = ev.Region(0, 3, SIDE, SIDE)
    region.pixels(frame)[...] = mask_image()
    seen = []

    def cropping_model(batch):
        batch = [np.asarray(b) for b in batch]
        seen.extend(batch)
        return mask_model(np.stack([region.pixels(b) for b in batch]))

    curves = ev.image_curves([frame], [MASK.astype(float)], [0], cropping_model, steps=10, regions=[region])
    assert curves.deletion[0] == pytest.approx([1, 0.6, 0.2] + [0.2] * 8)
    assert curves.deletion_auc[0] == pytest.approx(F + F * (1 - F) / 2)
    outside = np.ones(frame.shape[:2], dtype=bool)
    outside[3:13, :] = False
    deleted = [b for b in seen[:11]]
    assert all((b[outside] == 77).all() for b in deleted)  # deletion leaves the outside as it was
    assert (ev.deletion_substrate(frame, region) == round(255 * F)).all()  # the region's mean, not the frame's


@pytest.mark.parametrize("size, resize, crop", [((300, 457), 256, 224), ((457, 300), 256, 224), ((97, 64), 64, 64),
                                                ((200, 150), [100, 120], [90, 100]), ((123, 77), 72, [64, 60]),
                                                ((50, 40), None, [32, 30]), ((81, 99), [64, 60], None)])
def test_model_view_is_what_the_model_sees(size, resize, crop):
    """The frame through the model's preprocessing gives the original's tensor bit for bit, and
    the region is torchvision's centre crop of it."""
    from tsexplain.serving.images import Preprocessing
    from tsexplain.tools.eval_data import model_view
    from torchvision.transforms import functional as TF

    original = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))
    preprocessing = Preprocessing(resize, crop)
    view = model_view(original, preprocessing)
    assert torch.equal(preprocessing(Image.fromarray(view.frame)), preprocessing(original))
    resized = TF.resize(original, resize if isinstance(resize, list) else [resize], antialias=True) if resize else original
    expected = TF.center_crop(resized, crop) if crop else resized
    assert (view.region.pixels(view.frame) == np.asarray(expected)).all()


def test_model_view_refuses_a_crop_larger_than_the_image():
    from tsexplain.serving.images import Preprocessing
    from tsexplain.tools.eval_data import DataError, model_view

    with pytest.raises(DataError, match="larger than the resized image"):
        model_view(Image.new("RGB", (300, 200)), Preprocessing(None, 224))


def test_user_files_are_sampled_and_bad_ones_reported(tmp_path):
    from tsexplain.serving.images import Preprocessing
    from tsexplain.tools.eval_data import DataError, user_images, user_texts

    (tmp_path / "sub").mkdir()
    for k in range(5):
        Image.new("RGB", (40 + k, 30), (k, 0, 0)).save(tmp_path / "sub" / f"{k}.png")
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    (tmp_path / "readme.txt").write_text("not an image")
    views, skipped = user_images(tmp_path, 10, 0, Preprocessing(32, 32))
    assert len(views) == 5 and skipped == ["bad.jpg: the body is not a decodable image"]
    assert all(v.frame.shape[0] == 32 and v.region.width == 32 and v.box is None for v in views)
    three, _ = user_images(tmp_path, 3, 0, Preprocessing(32, 32))
    again, _ = user_images(tmp_path, 3, 0, Preprocessing(32, 32))
    assert len(three) == 3 and [v.name for v in three] == [v.name for v in again]  # the seed decides
    texts = tmp_path / "texts.txt"
    texts.write_text("first one\n\n  second  \n\nthird\n", encoding="utf-8")
    assert user_texts(texts, 10, 0) == ["first one", "second", "third"]
    texts.write_text("\n \n")
    with pytest.raises(DataError, match="no texts"):
        user_texts(texts, 10, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        user_images(tmp_path / "empty", 1, 0, Preprocessing(32, 32))
