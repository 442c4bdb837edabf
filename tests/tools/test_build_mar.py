"""build_mar.sh: user models are checked at build time, with clear errors."""
import json
import subprocess
from pathlib import Path

import pytest
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


def test_bad_settings_fail_at_build(tmp_path):
    """The model config is validated as the handler validates it at load: explain.audit and
    explain.tokens too. A sink may be left to the serving machine's environment."""
    import build_mar

    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), tmp_path / "w.pt")
    (tmp_path / "labels.json").write_text(json.dumps({"0": "a", "1": "b"}))
    build = ["image", "--name", "m", "--architecture", "resnet18", "--weights", tmp_path / "w.pt",
             "--labels", tmp_path / "labels.json", "--export-path", tmp_path / "store", "--config", tmp_path / "c.yaml"]
    for config, message in [
        ("explain: {audit: {record: every}}", "explain.audit.record must be one of"),
        ("explain: {audit: {record: all, sink: 'sqlite://relative.db'}}", "absolute file path"),
        ("explain: {audit: {record: all, retention: 30}}", "unknown setting(s) ['retention'] in 'explain.audit'"),
        ("explain: {tokens: {default: {env: T}}}", "'default' is reserved"),
        ("explain: {audit: [all]}", "explain.audit must be a mapping"),
        ("explain: {methods: [gradcam], method: layer_ig}", "explain.method"),
    ]:
        (tmp_path / "c.yaml").write_text(config)
        with pytest.raises(SystemExit) as failed:
            build_mar.main([str(a) for a in build])
        assert message in str(failed.value) and "bad settings in the model config" in str(failed.value), config
        assert not (tmp_path / "store" / "m.mar").exists()
    (tmp_path / "c.yaml").write_text("explain: {audit: {record: all}, tokens: {team-a: {env: TEAM_A_TOKEN}}}")
    build_mar.main([str(a) for a in build])
    assert (tmp_path / "store" / "m.mar").exists()
