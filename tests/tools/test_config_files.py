"""The repository's own TorchServe config: loopback only, token auth on."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def properties():
    lines = (ROOT / "config.properties").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_binds_to_loopback_and_keeps_token_auth():
    props = properties()
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:"), key
    assert props.get("disable_token_authorization", "false") != "true"
    assert props["model_metrics_auto_detect"] == "true"
