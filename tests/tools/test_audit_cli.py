"""tsexplain-audit as an operator runs it, on a SQLite trail (PostgreSQL: test_audit_postgres.py)."""
import base64
import dataclasses
import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from audit_entries import image_entry, text_entry
from tsexplain.serving.audit import AuditSettings, AuditTrail
from tsexplain.tools import audit as cli

ROOT = Path(__file__).resolve().parents[2]


def run(*argv):
    out = io.StringIO()
    code = cli.main(list(argv), out=out)
    return code, out.getvalue()


def png(width=100, height=80, color=(128, 128, 128)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def trail(tmp_path):
    """A trail with image and text records of two models; its path and the ids by name."""
    path = tmp_path / "audit.db"
    settings = AuditSettings(record="all", sink=f"sqlite://{path}", keep_input=True)
    shapes = AuditTrail.open(settings, model_name="shapes", model_version="1", mar_sha256="ab" * 32)
    reviews = AuditTrail.open(settings, model_name="reviews", model_version="1", mar_sha256="cd" * 32)
    image = image_entry(0, side=2, data=png(), caller="team-a")
    image = dataclasses.replace(image, parameters={"resize": 64, "crop": 64, "layer": "layer2"},
                                explanation={**image.explanation, "heatmap": {"shape": [2, 2], "values": [[1, 0], [0, 0]]}})
    ids = {"image": shapes.record([image])[0]}
    ids["text"] = reviews.record([text_entry(1, caller="team-b")])[0]
    ids["more"] = shapes.record([image_entry(k, method="layercam", caller=None) for k in range(2, 5)])
    shapes.close()
    reviews.close()
    return path, ids


def test_list_filters(trail, tmp_path):
    path, ids = trail
    db = f"sqlite://{path}"
    code, out = run("--db", db, "list")
    assert code == 0 and len(out.splitlines()) == 5
    assert out.splitlines()[0].split()[1] == ids["more"][-1]  # newest first
    assert run("--db", db, "list", "--model", "reviews")[1].split()[1] == ids["text"]
    assert [line.split()[1] for line in run("--db", str(path), "list", "--caller", "team-a")[1].splitlines()] == [ids["image"]]
    assert len(run("--db", db, "list", "--method", "layercam")[1].splitlines()) == 3
    image_file = tmp_path / "star.png"
    image_file.write_bytes(png())
    assert run("--db", db, "list", "--input", str(image_file))[1].split()[1] == ids["image"]
    digest = hashlib.sha256(png()).hexdigest()
    assert run("--db", db, "list", "--input-sha256", digest)[1].split()[1] == ids["image"]
    with sqlite3.connect(path) as conn:
        text_time = conn.execute("SELECT time FROM audit_records WHERE id = ?", (ids["text"],)).fetchone()[0]
    after = [line.split()[1] for line in run("--db", db, "list", "--since", text_time)[1].splitlines()]
    assert after == ids["more"][::-1] + [ids["text"]]
    before = [line.split()[1] for line in run("--db", db, "list", "--until", text_time)[1].splitlines()]
    assert before == [ids["image"]]
    assert run("--db", db, "list", "--since", "1h", "--limit", "2")[1].count("\n") == 2
    assert run("--db", db, "list", "--since", "yesterday-ish")[0] == 2


def test_show_prints_the_whole_record_and_draws_the_overlay_again(trail, tmp_path):
    path, ids = trail
    code, out = run("--db", str(path), "show", ids["image"], "--overlay", str(tmp_path / "o.png"),
                    "--input-out", str(tmp_path / "input.png"))
    record = json.loads(out)
    assert code == 0 and record["id"] == ids["image"] and record["caller"] == "team-a"
    assert record["explanation"]["heatmap"]["values"] == [[1, 0], [0, 0]]
    assert record["input"]["kept"] and record["chain"]["hash"] and "base64" not in record["input"]
    assert (tmp_path / "input.png").read_bytes() == png()
    overlay = np.asarray(Image.open(tmp_path / "o.png").convert("RGB")).astype(int)
    assert overlay.shape == (80, 100, 3)  # the original's size
    # resize 64 + crop 64 of a 100x80 image: the model saw x 10..90; the map's hot cell is its top left
    r, g, b = overlay[10, 20]
    assert r > 180 and g < 90 and b < 90  # red, over grey
    assert (overlay[40, 5] == 128).all() and (overlay[70, 80] == 128).all()  # outside the box, and cold
    code, out = run("--db", str(path), "show", ids["text"])
    assert code == 0 and json.loads(out)["explanation"]["words"][0]["word"] == "w0"
    assert run("--db", str(path), "show", ids["text"], "--overlay", str(tmp_path / "t.png"))[0] == 2
    assert run("--db", str(path), "show", "no-such-id")[0] == 1


def test_export_json_lines(trail, tmp_path):
    path, ids = trail
    code, out = run("--db", str(path), "export", "--model", "shapes")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["id"] for r in lines] == [ids["image"], *ids["more"]]  # oldest first
    assert all("base64" not in r["input"] for r in lines)
    target = tmp_path / "export.jsonl"
    assert run("--db", str(path), "export", "--with-input", "--out", str(target))[0] == 0
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(lines) == 5
    first = next(r for r in lines if r["id"] == ids["image"])
    assert base64.b64decode(first["input"]["base64"]) == png()


def edit(path, sql):
    if shutil.which("sqlite3"):
        subprocess.run(["sqlite3", str(path), sql], check=True)
    else:
        with sqlite3.connect(path) as conn:
            conn.execute(sql)


def test_verify_passes_then_names_the_edited_deleted_and_reordered_records(trail, tmp_path):
    path, ids = trail
    code, out = run("--db", str(path), "verify", "--save-heads", str(tmp_path / "heads.json"))
    assert code == 0 and out.strip().endswith("5 record(s) in 2 chain(s): OK")
    heads = json.loads((tmp_path / "heads.json").read_text())["heads"]
    assert sorted(h["seq"] for h in heads) == [0, 3]
    edit(path, f"UPDATE audit_records SET body = replace(body, '\"probability\":0.99', '\"probability\":0.42') "
               f"WHERE id = '{ids['more'][1]}'")
    code, out = run("--db", str(path), "verify")
    assert code == 1 and "BROKEN writer=shapes@" in out and f"seq=2 id={ids['more'][1]}" in out
    assert "FAILED: 1 broken chain(s)" in out and ids["text"] not in out
    edit(path, f"DELETE FROM audit_records WHERE id = '{ids['text']}'")
    code, out = run("--db", str(path), "verify", "--check-heads", str(tmp_path / "heads.json"))
    assert code == 1 and out.count("BROKEN") == 3  # the edit, the deleted record, its saved head
    assert "writer=reviews@" in out and "has no records" in out and "head saved earlier is missing" in out


def test_verify_detects_reordering(trail):
    path, ids = trail
    a, b = ids["more"][0], ids["more"][2]
    edit(path, f"UPDATE audit_records SET seq = -1 WHERE id = '{a}'; UPDATE audit_records SET seq = 1 WHERE id = '{b}'; "
               f"UPDATE audit_records SET seq = 3 WHERE id = '{a}'")
    code, out = run("--db", str(path), "verify")
    assert code == 1 and f"seq=1 id={b}" in out


def test_prune_and_progress(trail, monkeypatch, capsys):
    path, ids = trail
    monkeypatch.setattr(cli.Progress, "EVERY_S", 0.0)  # a line per record
    assert run("--db", str(path), "verify")[0] == 0
    assert "verified: 1 records" in capsys.readouterr().err
    with sqlite3.connect(path) as conn:
        cutoff = conn.execute("SELECT time FROM audit_records WHERE id = ?", (ids["more"][0],)).fetchone()[0]
    code, out = run("--db", str(path), "prune", "--before", cutoff, "--dry-run")
    assert code == 0 and "would prune 2 record(s) of 2 chain(s)" in out
    code, out = run("--db", str(path), "prune", "--before", cutoff)
    assert code == 0 and "pruned 2 record(s) of 2 chain(s)" in out
    assert run("--db", str(path), "list")[1].count("\n") == 3
    assert run("--db", str(path), "verify")[0] == 0
    assert run("--db", str(path), "prune", "--older-than", "soon")[0] == 2
    assert run("--db", str(path), "prune")[0] == 2


def test_the_trail_named_by_a_model_config_and_the_module_entry_point(trail, tmp_path):
    path, ids = trail
    config = tmp_path / "model-config.yaml"
    config.write_text(f"batchSize: 4\nexplain:\n  audit:\n    record: all\n    sink: sqlite://{tmp_path}/other.db\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), TSEXPLAIN_SHAPES_AUDIT_SINK=f"sqlite://{path}")
    done = subprocess.run([sys.executable, "-m", "tsexplain.tools.audit", "--config", str(config), "--config-model",
                           "shapes", "list", "--model", "reviews"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and ids["text"] in done.stdout and "1 record(s)" in done.stderr
    done = subprocess.run([sys.executable, "-m", "tsexplain.tools.audit", "--config", str(config), "verify"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "no trail there" in done.stderr  # other.db: not created by the command line
    assert not (tmp_path / "other.db").exists()
    env = dict(os.environ, PYTHONPATH=str(ROOT), TSEXPLAIN_AUDIT_SINK=f"sqlite://{path}")
    done = subprocess.run([sys.executable, "-m", "tsexplain.tools.audit", "verify"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "OK" in done.stdout
    assert "torch" not in subprocess.run(
        [sys.executable, "-c", "import sys, tsexplain.tools.audit; print(' '.join(sys.modules))"],
        capture_output=True, text=True, env=env).stdout.split()


def test_only_init_creates_a_trail(trail, tmp_path):
    path, ids = trail
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE notes (x TEXT)")
    assert run("--db", str(other), "list")[0] == 2
    with sqlite3.connect(other) as conn:  # left as it was
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["notes"]
    fresh = tmp_path / "new" / "audit.db"
    code, out = run("--db", str(fresh), "init")
    assert code == 0 and "audit trail ready" in out and oct(fresh.stat().st_mode & 0o777) == "0o600"
    assert run("--db", str(fresh), "verify")[1].strip().endswith("0 record(s) in 0 chain(s): OK")
    writers = [json.loads(line) for line in run("--db", str(path), "writers")[1].splitlines()]
    assert sorted(w["model"] for w in writers) == ["reviews", "shapes"]
    assert {w["model"]: w["head_seq"] for w in writers} == {"shapes": 3, "reviews": 0}
    assert all(w["closed_at"] for w in writers)
