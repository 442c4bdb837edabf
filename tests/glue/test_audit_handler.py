"""The audit trail through both handlers in process: what a record holds (the heatmap of an
overlay-only answer, the parameters that draw the overlay again, text attributions), the
MAR's hash, the metrics TorchServe gets, named tokens, and a sink that cannot be opened."""
import base64
import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from harness import EXPLAIN, InProcessHandler, build_image_mar, build_text_mar, png, unpack
from tsexplain.serving.audit import Filters, StoreError, open_store
from tsexplain.serving.cache import fingerprint_files
from tsexplain.tools import audit as audit_cli

TOKENS = {"team-a": {"env": "AUDIT_TEST_TEAM_A"}}


def records(db):
    store = open_store(f"sqlite://{db}", create=False)
    try:
        found = {r.id: (json.loads(r.body), r.input) for r in store.records(Filters())}
        assert store.verify()[0].ok
    finally:
        store.close()
    return found


def metric_calls(handler, name):
    return [call for call in handler.metrics.calls if call[1] and call[1][0] == name]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit_image")
    config = {"handler": {"resize": 64, "crop": 48},
              "explain": {"tokens": TOKENS, "cache_mb": 1, "overlay_alpha": 0.5, "methods": ["gradcam", "layer_ig"],
                          "audit": {"record": "all", "sink": f"sqlite://{tmp}/trail/audit.db", "keep_input": True}}}
    model_dir = unpack(build_image_mar(tmp, "pets", config=config), tmp / "unpacked")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AUDIT_TEST_TEAM_A", "team-a-secret")
        handler = InProcessHandler(model_dir, "image_explainer", "ImageExplainer")
    return handler, tmp / "trail" / "audit.db", model_dir


def picture():
    gradient = np.linspace(0, 255, 90 * 70 * 3).reshape(70, 90, 3).astype(np.uint8)
    return png(Image.fromarray(gradient))


def test_an_overlay_only_answer_keeps_its_heatmap_in_the_record(image, tmp_path):
    handler, db, model_dir = image
    team_a = {**EXPLAIN, "X-Explain-Token": "team-a-secret"}
    data = picture()
    both = {"data": base64.b64encode(data).decode(), "outputs": ["heatmap", "overlay_png"]}
    [(s1, with_map), (s2, overlay_only), (s3, prediction)] = handler([
        (both, team_a), ({**both, "outputs": ["overlay_png"]}, team_a), (data, {})])
    assert (s1, s2, s3) == (200, 200, 200) and "heatmap" not in overlay_only["explanation"]
    found = records(db)
    recorded = found[overlay_only["explanation"]["explanation_id"]][0]
    assert recorded["explanation"]["heatmap"] == with_map["explanation"]["heatmap"]  # the same map, kept
    assert "overlay_png" not in recorded["explanation"] and recorded["caller"] == "team-a"
    assert recorded["parameters"] == {"layer": "layer4", "n_steps": None, "integration": None, "baseline": None,
                                      "precision": "fp32", "heatmap_size": "feature", "outputs": ["overlay_png"],
                                      "heatmap_decimals": 3, "internal_batch_size": None, "resize": 64, "crop": 48,
                                      "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                      "overlay_alpha": 0.5}
    assert recorded["input"] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "kept": True,
                                 "content_type": "image/png"}
    assert recorded["model"]["mar_sha256"] == fingerprint_files(model_dir)  # the cache's fingerprint of the MAR
    assert recorded["predictions"] == overlay_only["predictions"]
    assert found[overlay_only["explanation"]["explanation_id"]][1] == data  # keep_input

    # tsexplain-audit show --overlay draws the answered overlay again from the record alone
    out = io.StringIO()
    assert audit_cli.main(["--db", str(db), "show", overlay_only["explanation"]["explanation_id"],
                           "--overlay", str(tmp_path / "again.png")], out=out) == 0
    answered = np.asarray(Image.open(io.BytesIO(base64.b64decode(overlay_only["explanation"]["overlay_png"]))))
    again = np.asarray(Image.open(tmp_path / "again.png"))
    assert again.shape == answered.shape == (70, 90, 3)
    assert np.abs(again.astype(int) - answered.astype(int)).max() <= 2  # the map was rounded to 3 decimals

    # a cache hit of the overlay-only request: its own record, with the heatmap still
    [(_, hit)] = handler([({**both, "outputs": ["overlay_png"]}, team_a)])
    assert hit["explanation"]["cached"] is True and "heatmap" not in hit["explanation"]
    assert records(db)[hit["explanation"]["explanation_id"]][0]["explanation"]["heatmap"] == \
        with_map["explanation"]["heatmap"]
    written = metric_calls(handler, "AuditRecordsWritten")
    assert len(written) == 3 and all(call[1][1] == 1 for call in written)
    assert [d.__dict__ for d in written[0][1][3]] == [{"name": "Method", "value": "gradcam"}]


def test_integrated_gradients_records_its_parameters_and_delta(image):
    handler, db, _ = image
    body = {"data": base64.b64encode(picture()).decode(), "method": "layer_ig", "n_steps": 8, "target": "dog"}
    [(status, answer)] = handler([(body, {**EXPLAIN, "X-Explain-Token": "team-a-secret"})])
    assert status == 200
    recorded = records(db)[answer["explanation"]["explanation_id"]][0]
    assert recorded["convergence_delta"] == answer["explanation"]["convergence_delta"]
    assert recorded["target"] == {"index": 1, "label": "dog"}
    assert {k: recorded["parameters"][k] for k in ("n_steps", "integration", "baseline", "internal_batch_size")} == {
        "n_steps": 8, "integration": "gausslegendre", "baseline": "zeros", "internal_batch_size": 32}


def test_text_records_hold_the_attributions_and_the_effective_parameters(tmp_path, monkeypatch):
    sink = f"sqlite://{tmp_path}/text.db"
    monkeypatch.setenv("TSEXPLAIN_NOTES_AUDIT_SINK", sink)  # the sink from the environment, as in a deployment
    mar = build_text_mar(tmp_path, "notes", config={"explain": {"n_steps": "auto", "audit": {"record": "priority"}}})
    handler = InProcessHandler(unpack(mar, tmp_path / "unpacked"), "text_explainer", "TextExplainer")
    text = "the soup was great but the staff were rude"
    out = handler([({"data": text, "html": True, "priority": "audit"}, EXPLAIN), (text, EXPLAIN)])
    assert [status for status, _ in out] == [200, 200] and "explanation_id" not in out[1][1]["explanation"]
    (recorded, kept), = records(tmp_path / "text.db").values()
    answered = out[0][1]["explanation"]
    assert recorded["id"] == answered["explanation_id"] and kept is None  # keep_input is off by default
    assert recorded["explanation"]["words"] == answered["words"] and "html" not in recorded["explanation"]
    assert recorded["converged"] == answered["converged"] is not None
    assert recorded["parameters"]["n_steps"] == answered["n_steps"] and recorded["parameters"]["adaptive"] == {
        "start": 8, "max": 256, "max_relative_delta": 0.05}  # max: the effective cap, adaptive_max left out
    assert {k: recorded["parameters"][k] for k in ("layer", "integration", "precision", "baseline")} == {
        "layer": answered["layer"], "integration": "gausslegendre", "precision": "fp32", "baseline": "pad"}
    assert recorded["input"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert recorded["priority"] == "audit" and recorded["caller"] is None


def test_a_sink_that_cannot_be_opened(tmp_path, monkeypatch):
    """on_failure: fail stops the model from loading; serve loads, answers without ids and counts."""
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("TSEXPLAIN_AUDIT_SINK", f"sqlite://{tmp_path}/a-file/audit.db")
    mar = build_text_mar(tmp_path, "notes", config={"explain": {"n_steps": 4, "audit": {"record": "all"}}})
    model_dir = unpack(mar, tmp_path / "unpacked")
    with pytest.raises(StoreError, match="cannot create the file"):
        InProcessHandler(model_dir, "text_explainer", "TextExplainer")
    monkeypatch.setenv("TSEXPLAIN_NOTES_AUDIT_ON_FAILURE", "serve")
    handler = InProcessHandler(model_dir, "text_explainer", "TextExplainer")
    [(status, body)] = handler([("a fine text", EXPLAIN)])
    assert status == 200 and body["explanation"]["words"] and "explanation_id" not in body["explanation"]
    lost = metric_calls(handler, "AuditRecordsLost")
    assert len(lost) == 1 and lost[0][1][1] == 1 and handler.handler.trail.lost_records == 1
