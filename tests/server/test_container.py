"""The container image, built with podman on a base made from Debian's packages (scripts/image.py),
carrying the demo MARs built from the current code, and served here on loopback ports: /ping,
/predictions and /explanations answer with the key read from inside the container, and the answers
equal the same MARs' in process; TorchServe runs as model-server with the pinned libraries; /metrics
counts the explanations; a stop is clean.

Skips, saying why, where podman is missing or cannot run containers (scripts/setup_env.sh installs
podman, runc and debootstrap as root). podman keeps the base image and the layer with the pinned
libraries between runs: the first build on a machine takes minutes, later ones seconds."""
import configparser
import json
import math
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from harness import EXPLAIN, InProcessHandler, png, unpack
from tsexplain.tools.synthetic import shapes

pytestmark = [pytest.mark.server, pytest.mark.container]
ROOT = Path(__file__).resolve().parents[2]
TAG = "localhost/torchserve-explain:test"
MODELS = {"shapes": "shapes.mar", "reviews": "reviews.mar"}
REVIEW = "the soup was great but the staff were rude"


def pins(lines) -> dict:
    """{name: version} of the ``name==version`` requirements among ``lines``."""
    found = (re.match(r"^\s*([A-Za-z0-9_.-]+)==([^\s;#]+)", line) for line in lines)
    return {m.group(1).lower(): m.group(2) for m in found if m}


def test_image_requirements_are_the_project_pins():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    project = pins(cfg["options"]["install_requires"].splitlines())
    image = pins((ROOT / "deploy" / "requirements.txt").read_text().splitlines())
    assert image == {k: v for k, v in project.items() if k != "torch-model-archiver"}


@pytest.fixture(scope="module")
def image(demo_store):
    import image as image_tool  # scripts/image.py

    reason = image_tool.cannot_build_here()
    if reason:
        pytest.skip(reason)
    return image_tool, image_tool.build_image(demo_store, TAG)


def podman(tool, *args, check=True):
    return subprocess.run(["podman", *args], env=tool.podman_env(), capture_output=True, text=True, check=check,
                          timeout=300)


@pytest.fixture(scope="module")
def container(image, tmp_path_factory):
    """The image running with its inference and metrics ports published on loopback (the management
    API listens on the container's loopback only), ready by its own probe (torchserve-explain-ready:
    /ping "Healthy", every model's workers up); a client (tsexplain.tools.launcher) with the inference key
    read from inside the container."""
    from tsexplain.tools.launcher import TorchServe, free_port

    tool, tag = image
    name = f"tsexplain-test-{os.getpid()}"
    ports = (free_port(), free_port(), free_port())
    podman(tool, "run", "-d", "--name", name, f"--publish=127.0.0.1:{ports[0]}:8080",
           f"--publish=127.0.0.1:{ports[2]}:8082", tag)
    try:
        deadline = time.monotonic() + 300
        while podman(tool, "exec", name, "torchserve-explain-ready", check=False).returncode != 0:
            assert podman(tool, "inspect", name, "--format", "{{.State.Running}}").stdout.strip() == "true", \
                podman(tool, "logs", name, check=False).stderr[-3000:]
            assert time.monotonic() < deadline, "the container was not ready after 300 s"
            time.sleep(1)
        client = TorchServe(ROOT / "model_store", MODELS, tmp_path_factory.mktemp("container"), ports=ports)
        client.keys = json.loads(podman(tool, "exec", name, "cat", "/home/model-server/key_file.json").stdout)
        yield tool, name, client
    finally:
        podman(tool, "rm", "-f", "-t", "0", name, check=False)


@pytest.fixture(scope="module")
def answers(container):
    """One prediction and one explanation per model, through the published port."""
    _, _, client = container
    image = png(shapes.generate(1, 20261202, 64)[0].image)
    out = {"image": image}
    for route, model, body, content_type in [("predictions", "shapes", image, "image/png"),
                                             ("explanations", "shapes", image, "image/png"),
                                             ("predictions", "reviews", REVIEW.encode(), "text/plain"),
                                             ("explanations", "reviews", REVIEW.encode(), "text/plain")]:
        status, raw = client.request("POST", f"{client.inference_url}/{route}/{model}", body,
                                     {"Content-Type": content_type})
        out[(route, model)] = (status, json.loads(raw))
    # KServe v1, as the ServingRuntime of docs/deployment.md serves it (TorchServe's own KServe routes)
    status, raw = client.request("POST", f"{client.inference_url}/v1/models/reviews:explain",
                                 json.dumps({"instances": [REVIEW]}).encode(), {"Content-Type": "application/json"})
    out["kserve"] = (status, json.loads(raw))
    return out


def approx_equal(a, b, path="") -> list[str]:
    """Where two JSON answers differ (numbers within 1e-4). Not compared: elapsed_ms (a time) and
    cached (whether it came from the worker's cache: the KServe call repeats a text)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) - {"cached"} != set(b) - {"cached"}:
            return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a if k not in ("elapsed_ms", "cached") for d in approx_equal(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in approx_equal(x, y, f"{path}/{i}")]
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return [] if math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4) else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def test_ping_needs_the_key_and_the_ready_probe_reads_it(container):
    tool, name, client = container
    status, body = client.request("GET", f"{client.inference_url}/ping")
    assert status == 200 and json.loads(body)["status"] == "Healthy"
    status, _ = client.request("GET", f"{client.inference_url}/ping", headers={"Authorization": "Bearer wrong"})
    assert status in (400, 401)  # token authorization is on, /ping included (TorchServe 0.12)
    assert podman(tool, "exec", name, "torchserve-explain-ready", check=False).returncode == 0
    # from a folder without key_file.json the probe sends no key, and /ping refuses it
    assert podman(tool, "exec", "-w", "/tmp", name, "torchserve-explain-ready", check=False).returncode == 1


def test_answers_need_the_key(container):
    _, _, client = container
    status, _ = client.request("POST", f"{client.inference_url}/predictions/reviews", REVIEW.encode(),
                               {"Authorization": "Bearer wrong", "Content-Type": "text/plain"})
    assert status in (400, 401)


def test_serves_what_the_mars_compute_in_process(answers, demo_store, tmp_path):
    for key in [("predictions", "shapes"), ("explanations", "shapes"), ("predictions", "reviews"),
                ("explanations", "reviews")]:
        assert answers[key][0] == 200, (key, answers[key])
    image_handler = InProcessHandler(unpack(demo_store / "shapes.mar", tmp_path / "shapes"), "image_explainer",
                                     "ImageExplainer")
    [(status, explained)] = image_handler([(answers["image"], EXPLAIN)])
    assert status == 200 and approx_equal(answers[("explanations", "shapes")][1], explained) == []
    assert explained["explanation"]["method"] == "gradcam" and explained["explanation"]["heatmap"]["values"]
    [(_, predicted)] = image_handler([(answers["image"], {})])
    assert approx_equal(answers[("predictions", "shapes")][1], predicted) == []
    text_handler = InProcessHandler(unpack(demo_store / "reviews.mar", tmp_path / "reviews"), "text_explainer",
                                    "TextExplainer")
    [(status, explained)] = text_handler([(REVIEW.encode(), EXPLAIN)])
    assert status == 200 and approx_equal(answers[("explanations", "reviews")][1], explained) == []
    assert answers["kserve"][0] == 200 and approx_equal(answers["kserve"][1], {"explanations": [explained]}) == []
    assert explained["explanation"]["method"] == "layer_ig" and explained["explanation"]["tokens"]
    [(_, predicted)] = text_handler([(REVIEW.encode(), {})])
    assert approx_equal(answers[("predictions", "reviews")][1], predicted) == []


def test_metrics_count_the_explanations(answers, container):
    from prometheus_client.parser import text_string_to_metric_families

    _, _, client = container
    status, body = client.request("GET", f"{client.metrics_url}/metrics", api="metrics")
    assert status == 200
    served = {(s.labels["ModelName"], s.labels["Method"]): s.value
              for family in text_string_to_metric_families(body.decode()) for s in family.samples
              if s.name == "ExplanationsServed_total"}
    assert served == {("shapes", "gradcam"): 1, ("reviews", "layer_ig"): 2}  # /explanations and KServe v1


def test_runs_as_model_server_with_the_pinned_libraries(container):
    tool, name, _ = container
    users = podman(tool, "top", name, "user").stdout.split()[1:]
    assert users and set(users) == {"model-server"}
    assert podman(tool, "exec", name, "id", "-u").stdout.strip() == "1000"  # runAsUser in docs/deployment.md
    versions = podman(tool, "exec", name, "python", "-c",
                      "import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
                      "['torch', 'torchvision', 'torchserve', 'captum', 'transformers', 'tokenizers']}))").stdout
    expected = pins((ROOT / "deploy" / "requirements.txt").read_text().splitlines())
    assert json.loads(versions) == {k: expected[k] for k in
                                    ("torch", "torchvision", "torchserve", "captum", "transformers", "tokenizers")}


def test_stops_cleanly(container):
    """Last: SIGTERM makes the entrypoint run `torchserve --stop`; TorchServe's status is 0."""
    tool, name, _ = container
    podman(tool, "stop", "-t", "60", name)
    assert podman(tool, "inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip() == "0"
