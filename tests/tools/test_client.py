"""tsexplain-client: the command as a user runs it, against a real TorchServe and a
recording HTTP server; the text highlighting and PNG helpers on their own."""
import configparser
import http.server
import importlib
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from harness import png
from tsexplain.tools import client
from tsexplain.tools.synthetic import shapes

ROOT = Path(__file__).resolve().parents[2]
REVIEW = "the place was packed and loud. Honestly, the service felt never horrible and the chef is from naples"
SECRET = "s3cret-for-explanations"


def run_client(args, cwd, env=None):
    """The installed console script when it is there, else the same entry point via -m."""
    script = Path(sys.executable).parent / "tsexplain.tools.client"
    command = [str(script)] if script.exists() and _script_is_ours(script) else [sys.executable, "-m", "tsexplain.tools.client"]
    environ = {**os.environ, "PYTHONPATH": str(ROOT)}
    environ.pop("NO_COLOR", None)
    environ.update(env or {})
    return subprocess.run(command + args, cwd=cwd, env=environ, capture_output=True, text=True, timeout=300)


def _script_is_ours(script: Path) -> bool:
    return "tsexplain.tools.client" in script.read_text(errors="replace")


def test_console_script_entry_point_is_declared():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    scripts = dict(line.split(" = ") for line in config["options.entry_points"]["console_scripts"].strip().splitlines())
    module, function = scripts["tsexplain-client"].split(":")
    assert callable(getattr(importlib.import_module(module), function))


def test_highlight_words_colour_and_plain():
    text = "never horrible, honestly"
    words = [{"word": "never", "start": 0, "end": 5, "attribution": 1.9},
             {"word": "horrible", "start": 6, "end": 14, "attribution": -0.9},
             {"word": "honestly", "start": 16, "end": 24, "attribution": 0.01}]
    coloured = client.highlight_words(text, words, color=True)
    assert coloured.count("\x1b[0m") == 2  # the weak word is left as it is
    assert "\x1b[48;5;34m\x1b[30mnever\x1b[0m" in coloured  # strongest green
    assert f"\x1b[48;5;{client._REDS[2]}m\x1b[30mhorrible" in coloured  # about half the peak, against
    stripped = coloured.replace("\x1b[0m", "")
    for code in ("\x1b[30m", "\x1b[48;5;34m", f"\x1b[48;5;{client._REDS[2]}m"):
        stripped = stripped.replace(code, "")
    assert stripped == text
    assert client.highlight_words(text, words, color=False, top=2) == "[+never] [-horrible], honestly"


def test_use_color_respects_no_color_and_tty(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert client.use_color("auto", Tty()) and not client.use_color("auto", io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not client.use_color("auto", Tty())
    assert client.use_color("always", io.StringIO()) and not client.use_color("never", Tty())


class Recorder(http.server.BaseHTTPRequestHandler):
    seen = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Recorder.seen.append((self.path, dict(self.headers), json.loads(body)))
        answer = json.dumps({"code": 400, "type": "unknown_field", "message": "unknown field(s) ['contrast']"}).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def test_options_headers_and_server_errors_pass_through(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "key_file.json").write_text(json.dumps({"inference": {"key": "inf-key"}, "management": {"key": "m"}}))
    (tmp_path / "token").write_text(SECRET + "\n")
    image = png(Image.new("RGB", (30, 20), "white"))
    (tmp_path / "in.png").write_bytes(image)
    try:
        result = run_client(["explain", "--model", "shapes", "in.png", "--out", "o.png", "--target", "star",
                             "--method", "gradcam", "--contrast", "circle", "--n-steps", "8", "--priority", "audit",
                             "--token-file", "token", "--option", "heatmap_size=input", "--option", "top_k=2",
                             "--url", f"http://127.0.0.1:{server.server_address[1]}"], cwd=tmp_path)
    finally:
        server.shutdown()
    assert result.returncode == 1 and "400 unknown_field: unknown field(s) ['contrast']" in result.stderr
    path, headers, body = Recorder.seen[-1]
    assert path == "/explanations/shapes"
    assert headers["Authorization"] == "Bearer inf-key" and headers["X-Explain-Token"] == SECRET
    assert headers["X-Priority"] == "audit" and headers["Content-Type"] == "application/json"
    assert body == {"data": client.base64.b64encode(image).decode(), "target": "star", "method": "gradcam",
                    "contrast": "circle", "n_steps": 8, "top_k": 2, "heatmap_size": "input",
                    "outputs": ["heatmap", "overlay_png"]}
    assert not (tmp_path / "o.png").exists()


class StreamedAnswer(http.server.BaseHTTPRequestHandler):
    """Answers as TorchServe answers an early-answered batch's carrier: chunked, 200."""

    protocol_version = "HTTP/1.1"
    body = {}

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("ts_stream_next", "true")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        data = json.dumps(StreamedAnswer.body).encode()
        self.wfile.write(b"0\r\n\r\n" if not data else f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n")

    def log_message(self, *args):
        pass


def test_an_error_in_a_streamed_200_is_an_error():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StreamedAnswer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    api = client.ExplainClient(f"http://127.0.0.1:{server.server_address[1]}")
    try:
        StreamedAnswer.body = {"code": 504, "type": "deadline_exceeded", "message": "the explanation did not finish"}
        with pytest.raises(client.ServerError) as raised:
            api.explain("reviews", "some text")
        assert raised.value.status == 504 and raised.value.body["type"] == "deadline_exceeded"
        StreamedAnswer.body = {"predictions": [], "explanation": {"method": "layer_ig"}}
        assert api.explain("reviews", "some text") == StreamedAnswer.body
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def server(demo_store, tmp_path_factory):
    from tsexplain.tools.launcher import TorchServe

    env = {"CLIENT_TEST_SECRET": SECRET, "TSEXPLAIN_REVIEWS_POLICY": "priority",
           "TSEXPLAIN_REVIEWS_PRIORITY_VALUES": "[audit]", "TSEXPLAIN_REVIEWS_TOKEN_ENV": "CLIENT_TEST_SECRET"}
    with TorchServe(demo_store, {"shapes": "shapes.mar", "reviews": "reviews.mar"},
                    tmp_path_factory.mktemp("client-ts"), env=env) as ts:
        yield ts


@pytest.mark.server
def test_readme_one_liner_saves_the_overlay(server, demo_store):
    size = json.loads((demo_store.parent / "demo" / "shapes" / "training.json").read_text())["image_size"]
    sample = next(s for s in shapes.generate(40, 777, size) if shapes.SHAPE_CLASSES[s.label] == "star")
    picture = sample.image.resize((size * 2, size + 17))  # not square, not the model's size
    (server.workdir / "star.png").write_bytes(png(picture))
    # as in the README, run where TorchServe was started (key_file.json is there)
    result = run_client(["explain", "--model", "shapes", "star.png", "--out", "overlay.png",
                         "--url", server.inference_url], cwd=server.workdir)
    assert result.returncode == 0, result.stderr
    with Image.open(server.workdir / "overlay.png") as overlay:
        overlay.load()
        assert overlay.format == "PNG" and overlay.size == picture.size
    assert result.stdout.splitlines()[0].split()[-1] == "star"
    assert "explained: star (method gradcam" in result.stdout
    assert f"overlay saved to overlay.png ({picture.size[0]}x{picture.size[1]})" in result.stdout

    result = run_client(["explain", "--model", "shapes", "star.png", "--json", "--url", server.inference_url],
                        cwd=server.workdir)
    answer = json.loads(result.stdout)
    assert answer["explanation"]["target"]["label"] == "star" and "heatmap" in answer["explanation"]

    result = run_client(["explain", "--model", "shapes", "star.png", "--method", "lime", "--url", server.inference_url],
                        cwd=server.workdir)
    assert result.returncode == 1 and "400 unknown_method" in result.stderr


@pytest.mark.server
def test_text_highlighting_token_and_priority(server):
    args = ["explain", "--model", "reviews", "--text", REVIEW, "--n-steps", "32", "--url", server.inference_url]
    denied = run_client(args, cwd=server.workdir)
    assert denied.returncode == 1 and "403 explanation_denied" in denied.stderr

    guarded = args + ["--priority", "audit", "--token-env", "CLIENT_TEST_SECRET"]
    coloured = run_client(guarded + ["--color", "always"], cwd=server.workdir, env={"CLIENT_TEST_SECRET": SECRET})
    assert coloured.returncode == 0, coloured.stderr
    status, raw = server.request("POST", f"{server.inference_url}/explanations/reviews",
                                 json.dumps({"data": REVIEW, "n_steps": 32, "priority": "audit"}).encode(),
                                 {"Content-Type": "application/json", "X-Explain-Token": SECRET})
    explanation = json.loads(raw)["explanation"]
    top = explanation["top_words"][0]
    peak = max(abs(w["attribution"]) for w in explanation["words"])
    code = client._GREENS[min(4, int(top["attribution"] / peak * 5))]
    assert f"\x1b[48;5;{code}m\x1b[30m{REVIEW[top['start']:top['end']]}\x1b[0m" in coloured.stdout
    assert f"top words: {top['word']} {top['attribution']:+.3f}" in coloured.stdout
    assert f"convergence delta: {explanation['convergence_delta']['absolute']:.3g}" in coloured.stdout

    plain = run_client(guarded, cwd=server.workdir, env={"CLIENT_TEST_SECRET": SECRET, "NO_COLOR": "1"})
    assert "\x1b[" not in plain.stdout
    assert f"[+{REVIEW[top['start']:top['end']]}]" in plain.stdout

    # method and contrast reach the server as given; an option the method does not take is the server's 400
    no_steps = [a for a in guarded if a not in ("--n-steps", "32")]
    contrastive = run_client(no_steps + ["--method", "grad_x_input", "--contrast", "negative", "--target", "positive",
                                         "--json"], cwd=server.workdir, env={"CLIENT_TEST_SECRET": SECRET})
    assert contrastive.returncode == 0, contrastive.stderr
    stepped = run_client(guarded + ["--method", "grad_x_input"], cwd=server.workdir, env={"CLIENT_TEST_SECRET": SECRET})
    assert stepped.returncode == 1 and "400 bad_n_steps" in stepped.stderr
    explanation = json.loads(contrastive.stdout)["explanation"]
    assert explanation["method"] == "grad_x_input" and "negative" in json.dumps(explanation["contrast"])
    same = run_client(guarded + ["--contrast", "positive", "--target", "positive"], cwd=server.workdir,
                      env={"CLIENT_TEST_SECRET": SECRET})
    assert same.returncode == 1 and "400 bad_contrast" in same.stderr


def test_the_explanation_id_is_printed(tmp_path):
    """With the audit trail on, the answer's explanation_id is what tsexplain-audit show takes."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StreamedAnswer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    record_id = "6f1c3a52-0b8e-4d7c-9f0e-2a1b3c4d5e6f"
    explanation = {"method": "layer_ig", "target": {"index": 1, "label": "positive"}, "elapsed_ms": 12.5,
                   "words": [], "top_words": []}
    try:
        StreamedAnswer.body = {"predictions": [{"index": 1, "label": "positive", "probability": 0.9}],
                               "explanation": {**explanation, "explanation_id": record_id}}
        shown = run_client(["explain", "--model", "reviews", "--text", "fine", "--url", url], cwd=tmp_path)
        StreamedAnswer.body = {"predictions": [], "explanation": explanation}
        without = run_client(["explain", "--model", "reviews", "--text", "fine", "--url", url], cwd=tmp_path)
    finally:
        server.shutdown()
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[1:3] == ["explained: positive (method layer_ig, 12.5 ms)",
                                              f"explanation id: {record_id}"]
    assert without.returncode == 0 and "explanation id" not in without.stdout
