"""The repository's own TorchServe configs: the demo's (loopback only, token auth on) and the
container's (deploy/), both serving Prometheus metrics declared in deploy/metrics.yaml."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def properties(path="config.properties"):
    lines = (ROOT / path).read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_binds_to_loopback_and_keeps_token_auth():
    props = properties()
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:"), key
    assert props.get("disable_token_authorization", "false") != "true"


def test_metrics_in_prometheus_format_from_the_repository_yaml():
    demo, container = properties(), properties("deploy/config.properties")
    for props in (demo, container):
        assert props["metrics_mode"] == "prometheus"
        assert props["model_metrics_auto_detect"] == "true"
        assert props.get("disable_token_authorization", "false") != "true"
    assert (ROOT / demo["metrics_config"]).resolve() == ROOT / "deploy" / "metrics.yaml"  # relative to the root
    assert container["metrics_config"] == "/home/model-server/metrics.yaml"  # where the Dockerfile puts it
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY deploy/config.properties deploy/metrics.yaml /home/model-server/" in dockerfile


def test_metrics_yaml_keeps_torchserve_defaults():
    """deploy/metrics.yaml replaces TorchServe's default file: every default entry stays, unchanged."""
    import ts

    default = yaml.safe_load((Path(ts.__file__).parent / "configs" / "metrics.yaml").read_text())
    ours = yaml.safe_load((ROOT / "deploy" / "metrics.yaml").read_text())
    for section in ("ts_metrics", "model_metrics"):
        for kind, entries in default[section].items():
            mine = {m["name"]: m for m in ours[section][kind]}
            for entry in entries:
                assert mine.get(entry["name"]) == entry, (section, kind, entry["name"])


def test_container_config_keeps_management_inside_and_token_auth_on():
    props = properties("deploy/config.properties")
    assert props["management_address"].startswith("http://127.0.0.1:")
    assert props["inference_address"] == "http://0.0.0.0:8080" and props["metrics_address"] == "http://0.0.0.0:8082"
    assert props.get("disable_token_authorization", "false") != "true"
