"""The audit trail through a real TorchServe, with SQLite, as a new user meets it.

One TorchServe serves ``shapes`` (the demo model, built with the trail on in its MAR
config, inputs kept), ``lanes`` (a tiny text model with ``asyncCommunication``) and
``notes`` (the same, served synchronously): an answer's ``explanation_id`` leads to the
same explanation with ``tsexplain-audit``; ``verify`` names a record edited with
sqlite3; predictions never wait for a write with ``asyncCommunication`` (the control:
synchronously, a prediction in the batch does); a worker SIGKILLed mid-traffic loses
no record whose answer was sent, and the trail grows on through the worker's and
TorchServe's restarts.
"""
import base64
import hashlib
import io
import json
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from audit_traffic import Target, audit_cli, exported, soak, worker_pids
from harness import build_text_mar, png
from tsexplain.tools.synthetic import shapes

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "build" / "demo" / "shapes"
TEXT = {"Content-Type": "text/plain"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import build_mar

    from tsexplain.tools.launcher import TorchServe

    tmp = tmp_path_factory.mktemp("audit")
    trail = tmp / "trail" / "audit.db"
    training = json.loads((DEMO / "training.json").read_text())
    config = tmp / "shapes-config.yaml"  # as a user writes it: the trail on in the MAR's config
    config.write_text(yaml.safe_dump({
        "handler": {"resize": training["image_size"], "crop": training["image_size"]},
        "explain": {"target_layer": training["target_layer"],
                    "audit": {"record": "all", "sink": f"sqlite://{trail}", "keep_input": True}}}))
    build_mar.main(["image", "--name", "shapes", "--architecture", training["architecture"], "--weights",
                    str(DEMO / "weights.pt"), "--labels", str(DEMO / "index_to_name.json"), "--config", str(config),
                    "--export-path", str(tmp / "store")])
    explain = {"n_steps": 8, "audit": {"record": "all", "timeout_ms": 60000}}
    build_text_mar(tmp, "lanes", config={"asyncCommunication": True, "batchSize": 1, "explain": {
        **explain, "async_max_batch_delay_ms": 50}})
    build_text_mar(tmp, "notes", config={"batchSize": 8, "maxBatchDelay": 300, "explain": explain})
    env = {"TSEXPLAIN_LANES_AUDIT_SINK": f"sqlite://{tmp}/lanes.db",
           "TSEXPLAIN_NOTES_AUDIT_SINK": f"sqlite://{tmp}/notes.db"}
    models = {"shapes": "shapes.mar", "lanes": "lanes.mar", "notes": "notes.mar"}
    server = TorchServe(tmp / "store", models, tmp / "ts", env=env)
    server.start(timeout=600)
    try:
        yield server, f"sqlite://{trail}", tmp
    finally:
        server.stop()


def star_png(size: int, seed: int = 20261202) -> bytes:
    sample = next(s for s in shapes.generate(40, seed, size) if shapes.SHAPE_CLASSES[s.label] == "star")
    return png(sample.image.resize((size * 2, size + 9)))


def client(*args, cwd):
    return subprocess.run([sys.executable, "-m", "tsexplain.tools.client", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={"PYTHONPATH": str(ROOT), "NO_COLOR": "1", "PATH": "/usr/bin:/bin"})


def test_a_new_user_finds_verifies_and_catches_an_edit(served, tmp_path):
    server, sink, _ = served
    size = json.loads((DEMO / "training.json").read_text())["image_size"]
    (server.workdir / "star.png").write_bytes(star_png(size))
    url = ["--url", server.inference_url]
    printed = client("explain", "--model", "shapes", "star.png", *url, cwd=server.workdir)
    assert printed.returncode == 0, printed.stderr
    [printed_id] = [line.split()[-1] for line in printed.stdout.splitlines() if line.startswith("explanation id: ")]
    answered = client("explain", "--model", "shapes", "star.png", "--json", *url, cwd=server.workdir)
    answer = json.loads(answered.stdout)
    record_id = answer["explanation"]["explanation_id"]
    assert record_id != printed_id

    shown = audit_cli("--db", sink, "show", record_id)
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["explanation"] == {k: v for k, v in answer["explanation"].items() if k != "explanation_id"}
    assert record["predictions"] == answer["predictions"] and record["target"] == answer["explanation"]["target"]
    assert record["route"] == "explanations" and record["model"]["name"] == "shapes" and record["status"] == 200
    redrawn = audit_cli("--db", sink, "show", record_id, "--overlay", tmp_path / "again.png")
    assert redrawn.returncode == 0 and Image.open(tmp_path / "again.png").size == (size * 2, size + 9)

    # from the input file: list --input hashes it, --input-sha256 takes the hash
    found = audit_cli("--db", sink, "list", "--input", server.workdir / "star.png")
    digest = hashlib.sha256((server.workdir / "star.png").read_bytes()).hexdigest()
    by_hash = audit_cli("--db", sink, "list", "--input-sha256", digest, "--model", "shapes")
    assert [line.split()[1] for line in found.stdout.splitlines()] == [record_id, printed_id]
    assert by_hash.stdout == found.stdout and f"{record['target']['label']}  status=200" in found.stdout

    verified = audit_cli("--db", sink, "verify")
    assert verified.returncode == 0 and verified.stdout.strip().endswith(": OK"), verified.stdout
    # a consistent copy (what sqlite3's .backup does, workers writing or not), then one row edited in it
    path = sink.removeprefix("sqlite://")
    copy = tmp_path / "copy.db"
    with sqlite3.connect(path) as live, sqlite3.connect(copy) as backup:
        live.backup(backup)
    label = record["target"]["label"]
    edit = (f"UPDATE audit_records SET body = replace(body, '\"label\":\"{label}\"', '\"label\":\"tampered\"') "
            f"WHERE id = '{printed_id}'")
    if shutil.which("sqlite3"):  # the command-line shell, as a user (or an attacker) would
        subprocess.run(["sqlite3", str(copy), edit], check=True, timeout=60)
    else:  # the same SQL through Python's sqlite3 where Debian's shell is not installed
        with sqlite3.connect(copy) as connection:
            connection.execute(edit)
    broken = audit_cli("--db", copy, "verify")
    assert broken.returncode == 1 and "FAILED: 1 broken chain(s)" in broken.stdout
    [line] = [line for line in broken.stdout.splitlines() if line.startswith("BROKEN")]
    assert f"id={printed_id}" in line and "hash" in line, line
    assert audit_cli("--db", sink, "verify").returncode == 0  # the live trail is untouched


def post_text(server, route, model, text, timeout=120):
    return server.request("POST", f"{server.inference_url}/{route}/{model}", text.encode(), TEXT, timeout=timeout)


def while_the_trail_is_locked(server, model, db: Path, during):
    """An explanation of ``model`` whose record waits for the trail's write lock (held here),
    and ``during()`` run meanwhile; returns (whether the explanation was still unanswered when
    ``during`` returned, what it returned, the explanation's answer)."""
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    answer = {}
    explaining = threading.Thread(target=lambda: answer.update(
        reply=post_text(server, "explanations", model, "the soup was great and the staff were kind")))
    try:
        explaining.start()
        time.sleep(0.05)  # it goes first
        during_result = during()
        pending = explaining.is_alive()
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    explaining.join(timeout=120)
    return pending, during_result, answer["reply"]


def test_predictions_never_wait_for_the_write_with_async_communication(served):
    server, _, tmp = served

    def predictions():
        return [post_text(server, "predictions", "lanes", f"prediction {i}", timeout=60)[0] for i in range(4)]

    pending, statuses, (status, raw) = while_the_trail_is_locked(server, "lanes", tmp / "lanes.db", predictions)
    assert statuses == [200] * 4 and pending  # answered while the explanation's record waited for the lock
    explanation = json.loads(raw)["explanation"]
    assert status == 200 and explanation["explanation_id"] in exported(f"sqlite://{tmp}/lanes.db")


def test_control_synchronously_a_prediction_in_the_batch_waits_for_the_write(served):
    """The same through the synchronous twin: the prediction shares the explanation's batch
    (maxBatchDelay 300 ms), which is answered after its records are committed."""
    server, _, tmp = served
    seen = {}

    def one_prediction():
        predicting = threading.Thread(target=lambda: seen.update(reply=post_text(server, "predictions", "notes", "x")))
        predicting.start()
        time.sleep(3)
        # read while the lock is held: once it is released, the batch's answers race this thread
        return predicting, predicting.is_alive()

    pending, (predicting, waiting), (status, raw) = while_the_trail_is_locked(
        server, "notes", tmp / "notes.db", one_prediction)
    waited = waiting and pending
    predicting.join(timeout=120)
    assert waited and seen["reply"][0] == 200 and status == 200
    assert json.loads(raw)["explanation"]["explanation_id"] in exported(f"sqlite://{tmp}/notes.db")


def test_a_killed_worker_loses_no_answered_record_and_restarts_append(served):
    server, sink, tmp = served
    size = json.loads((DEMO / "training.json").read_text())["image_size"]
    images = [png(s.image) for s in shapes.generate(24, 7, size)]

    def explanation(rng):
        return json.dumps({"data": base64.b64encode(rng.choice(images)).decode()}).encode(), {
            "Content-Type": "application/json"}

    def prediction(rng):
        return rng.choice(images), {}

    before = set(exported(sink))
    result = soak([Target(server, "shapes", explanation, prediction)], threads=4, kill=0, kill_after_s=8,
                  after_restart_s=6)
    assert result.new_pid is not None, "TorchServe did not restart the killed worker"
    received = set(result.ids())
    records = exported(sink)
    assert received and received <= set(records), f"{len(received - set(records))} answered records missing"
    writers = {r["writer"] for i, r in records.items() if i not in before}
    pids = {int(w.split(":")[1]) for w in writers}
    assert {result.killed_pid, result.new_pid} <= pids  # the killed worker's chain and the new worker's
    assert any(records[i]["writer"].split(":")[1] == str(result.new_pid) for i in received)
    assert any(records[i]["writer"].split(":")[1] == str(result.killed_pid) for i in received)
    statuses = {status for _, kind, status, _ in result.answers if kind == "prediction"}
    assert 200 in statuses
    verified = audit_cli("--db", sink, "verify")
    assert verified.returncode == 0, verified.stdout

    # TorchServe itself restarted: a new writer, appended to the same trail, which still verifies
    server.stop()
    server.start(timeout=600)
    status, raw = server.request("POST", f"{server.inference_url}/explanations/shapes", images[0])
    assert status == 200
    after = exported(sink)
    new_id = json.loads(raw)["explanation"]["explanation_id"]
    assert set(records) < set(after) and new_id in after
    assert after[new_id]["writer"] not in {r["writer"] for r in records.values()}
    assert audit_cli("--db", sink, "verify").returncode == 0
    assert worker_pids(server, "shapes")
