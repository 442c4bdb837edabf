"""build_mar.sh: user models are checked at build time, with clear errors."""
import json
import subprocess
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[2]


def run_build(*args):
    return subprocess.run([str(ROOT / "build_mar.sh"), *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def test_weights_that_do_not_fit_the_labels_fail_at_build(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), tmp_path / "w.pt")
    (tmp_path / "labels.json").write_text(json.dumps({"0": "a", "1": "b"}))
    result = run_build("image", "--name", "m", "--architecture", "resnet18", "--weights", tmp_path / "w.pt",
                       "--labels", tmp_path / "labels.json", "--export-path", tmp_path / "store")
    assert result.returncode != 0
    assert "do not fit resnet18(num_classes=2)" in result.stderr and "2 classes" in result.stderr
    assert not (tmp_path / "store" / "m.mar").exists()


def test_unknown_architecture_and_missing_hf_folder(tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps({"0": "a"}))
    torch.save({}, tmp_path / "w.pt")
    result = run_build("image", "--name", "m", "--architecture", "resnet19", "--weights", tmp_path / "w.pt",
                       "--labels", tmp_path / "labels.json", "--export-path", tmp_path / "store")
    assert result.returncode != 0 and "unknown torchvision architecture 'resnet19'" in result.stderr
    result = run_build("text", "--name", "t", "--model-dir", tmp_path, "--export-path", tmp_path / "store")
    assert result.returncode != 0 and "not a Hugging Face model directory" in result.stderr
