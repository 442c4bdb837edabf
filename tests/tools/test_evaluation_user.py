"""``tsexplain-eval`` on a user's MAR with the user's own data, in process: a folder of images of
any size and a text file. The curves' end points are checked against an independent computation
of what the model sees (torchvision's transforms on the original file, the model built apart)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision import transforms

import build_mar
from tsexplain.serving.models import build_torchvision_classifier
from tsexplain.tools.evaluate import main
from tsexplain.tools.synthetic import shapes

DEMO = Path(__file__).resolve().parents[2] / "build" / "demo"
RESIZE, CROP = 72, [64, 60]  # the model sees a centre crop of the resized image, not all of it


@pytest.fixture(scope="module")
def user_mar(tmp_path_factory):
    """The demo shapes weights packaged as a user would, with their own resize and crop."""
    tmp = tmp_path_factory.mktemp("user-mar")
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump({"handler": {"resize": RESIZE, "crop": CROP}, "explain": {"target_layer": "layer2"}}))
    build_mar.main(["image", "--name", "usershapes", "--architecture", "resnet18", "--weights",
                    str(DEMO / "shapes" / "weights.pt"), "--labels", str(DEMO / "shapes" / "index_to_name.json"),
                    "--config", str(config), "--export-path", str(tmp)])
    return tmp / "usershapes.mar"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    (folder / "holiday").mkdir()
    rng = np.random.default_rng(7)
    for k, sample in enumerate(shapes.generate(5, 4242, 96)):
        size = (int(rng.integers(70, 200)), int(rng.integers(70, 200)))
        image = sample.image.convert("RGB").resize(size, Image.BICUBIC)
        image.save(folder / "holiday" / f"photo{k}.png")  # lossless: the test decodes the same pixels
    (folder / "corrupt.png").write_bytes(b"\x89PNG not really")
    return folder


def test_images_from_a_folder_on_a_users_mar(user_mar, photos, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["image", "--mar", str(user_mar), "--images", str(photos), "--n", "5", "--steps", "4",
                 "--random-maps", "1", "--sanity", "--sanity-n", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["geometry"]["resize"] == "checked on 2 images" and report["geometry"]["crop"] == "checked"
    assert report["data"] == f"5 images from {photos}"
    assert any("corrupt.png" in note for note in report["notes"])
    assert "pointing_game" not in report["metrics"] and "accuracy" not in report["metrics"]  # no ground truth
    assert report["settings"]["model_input"].startswith("60x64")
    assert "deletion AUC" in printed and "pointing game" not in printed and "sanity check: " in printed
    assert report["sanity"]["stages"][1]["block"] == "fc" and report["sanity"]["verdict"] in ("pass", "fail")
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "curves.png", "sanity.png"}

    # Independently: the model as built from its weights, fed the original files through torchvision.
    model = build_torchvision_classifier("resnet18", 6, str(DEMO / "shapes" / "weights.pt")).eval()
    geometry = transforms.Compose([transforms.Resize(RESIZE), transforms.CenterCrop(CROP)])
    normalise = transforms.Compose([transforms.ToTensor(),
                                    transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    def probabilities(image):
        with torch.no_grad():
            return torch.softmax(model(normalise(image)[None]), 1)[0].numpy()

    for sample in report["per_sample"]:
        seen = geometry(Image.open(photos / sample["name"]).convert("RGB"))
        assert np.asarray(seen).shape == (64, 60, 3)
        p = probabilities(seen)
        assert sample["target"] == int(p.argmax())
        assert sample["probability"] == pytest.approx(float(p[sample["target"]]), abs=1e-5)
        mean = np.round(np.asarray(seen).reshape(-1, 3).mean(0)).astype(np.uint8)
        blank = Image.fromarray(np.broadcast_to(mean, (64, 60, 3)).copy())
        assert sample["deletion_end"] == pytest.approx(float(probabilities(blank)[sample["target"]]), abs=1e-5)


def test_texts_from_a_file_on_a_users_mar(demo_store, tmp_path, capsys):
    from tsexplain.tools.eval_backends import InProcessText

    texts = tmp_path / "my-reviews.txt"
    texts.write_text("the soup was superb and the staff were kind\n\n"
                     "i would not come back, the room was filthy\n"
                     "an ordinary evening; nothing to report\n", encoding="utf-8")
    out = tmp_path / "report"
    assert main(["text", "--mar", str(demo_store / "reviews.mar"), "--texts", str(texts), "--max-words", "2",
                 "--random-repeats", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["data"] == f"3 texts from {texts}" and report["settings"]["n"] == 3
    assert not any(name.startswith("cue_hit") for name in report["metrics"]) and "cue hit" not in printed
    assert "drop_at_1" in report["metrics"] and "prob. drop, top 1 deleted" in printed
    lines = [line for line in texts.read_text().splitlines() if line]
    reference = InProcessText(DEMO / "reviews").predict_proba(lines)  # the model apart from the MAR
    for line, sample, p in zip(lines, report["per_sample"], reference):
        assert sample["target"] == int(p.argmax())
        assert sample["curve"][0] == pytest.approx(float(p[sample["target"]]), abs=1e-5)
        assert len(sample["curve"]) == 3
