"""The viewer (viewer/index.html) in headless Chromium against a real TorchServe.

Two ways a browser can reach TorchServe 0.12, both driven here with the demo models:

- cross-origin, through TorchServe's CORS settings: TorchServe checks its token on
  the CORS preflight too (OPTIONS carries no Authorization header, so it gets 400),
  so this works only with TorchServe's token authorization off;
- same origin: the page and the API behind one proxy (here a tiny forwarding server
  standing in for an ingress), with token authorization on and the key typed in.

Chromium is Debian's ``chromium`` (``scripts/setup_env.sh`` installs it when it can),
driven by Playwright with ``executable_path``; nothing is downloaded, and a request
the page makes to another host fails the test. Requests are observed, not routed:
with routing on, Playwright answers CORS preflights itself and TorchServe's own CORS
behaviour would go untested.
"""
import http.client
import http.server
import json
import os
import re
import shutil
import threading
import urllib.parse
from functools import partial
from pathlib import Path

import pytest

from harness import png
from tsexplain.tools.synthetic import shapes

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]
VIEWER = ROOT / "viewer"
SCREENSHOTS = ROOT / "build" / "viewer-screenshots"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REVIEW = "the place was packed and loud. Honestly, the service felt never horrible and the chef is from naples"
FORWARDED = ("authorization", "content-type", "x-explain-token", "x-priority")


def chromium_path():
    path = os.environ.get("TSEXPLAIN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium; scripts/setup_env.sh does it as root)")
    return path


class ViewerHandler(http.server.SimpleHTTPRequestHandler):
    """Serves viewer/; with ``api`` set, forwards POST /explanations/* and /predictions/* to it."""

    api = None

    def do_POST(self):
        if self.api is None or not self.path.startswith(("/explanations/", "/predictions/")):
            self.send_error(404)
            return
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        headers = {k: v for k, v in self.headers.items() if k.lower() in FORWARDED}
        target = urllib.parse.urlsplit(self.api)
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=120)
        try:
            connection.request("POST", self.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            self.send_response(response.status)
            self.send_header("Content-Type", response.getheader("Content-Type", "application/json"))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        finally:
            connection.close()

    def log_message(self, *args):
        pass


def serve_viewer(api=None):
    handler = type("Handler", (ViewerHandler,), {"api": api})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(VIEWER)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture(scope="module")
def viewer_origin():
    server, url = serve_viewer()
    yield url
    server.shutdown()


def cors_properties(origin):
    return {"cors_allowed_origin": origin, "cors_allowed_methods": "GET, POST, OPTIONS",
            "cors_allowed_headers": "Authorization, Content-Type, X-Explain-Token, X-Priority"}


@pytest.fixture(scope="module")
def open_server(demo_store, tmp_path_factory, viewer_origin):
    """TorchServe with CORS for the viewer's origin and token authorization off."""
    from tsexplain.tools.launcher import TorchServe

    properties = {**cors_properties(viewer_origin), "disable_token_authorization": "true"}
    with TorchServe(demo_store, {"shapes": "shapes.mar", "reviews": "reviews.mar"},
                    tmp_path_factory.mktemp("viewer-open"), properties=properties) as ts:
        yield ts


@pytest.fixture(scope="module")
def guarded_server(demo_store, tmp_path_factory, viewer_origin):
    """TorchServe with token authorization on (and the same CORS settings)."""
    from tsexplain.tools.launcher import TorchServe

    with TorchServe(demo_store, {"shapes": "shapes.mar"}, tmp_path_factory.mktemp("viewer-guarded"),
                    properties=cors_properties(viewer_origin)) as ts:
        yield ts


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    executable = chromium_path()
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    playwright = sync_api.sync_playwright().start()
    context = playwright.chromium.launch_persistent_context(
        str(tmp_path_factory.mktemp("chromium-profile")), executable_path=executable, headless=True,
        args=CHROMIUM_FLAGS, viewport={"width": 1100, "height": 1400})
    context.external = []

    def only_loopback(request):  # observed, not intercepted: Playwright's routing would answer CORS preflights itself
        if not request.url.startswith(("data:", "blob:")) and urllib.parse.urlsplit(request.url).hostname != "127.0.0.1":
            context.external.append(request.url)

    context.on("request", only_loopback)
    yield context
    context.close()
    playwright.stop()
    assert context.external == [], f"the page tried to load from elsewhere: {context.external}"


@pytest.fixture(scope="module")
def star_png(tmp_path_factory, demo_store):
    size = json.loads((demo_store.parent / "demo" / "shapes" / "training.json").read_text())["image_size"]
    sample = next(s for s in shapes.generate(40, 424242, size) if shapes.SHAPE_CLASSES[s.label] == "star")
    path = tmp_path_factory.mktemp("viewer-input") / "star.png"
    path.write_bytes(png(sample.image))
    return path, sample.image.size


def fill_request(page, url, model, method="", target="", n_steps=""):
    page.fill("#url", url)
    page.fill("#model", model)
    page.fill("#method", method)
    page.fill("#target", target)
    page.fill("#n_steps", n_steps)


def explain_image(page, star_png):
    page.check("#kind-image")
    page.set_input_files("#file", str(star_png[0]))
    page.wait_for_selector("#preview", state="visible")
    page.click("#explain")
    page.wait_for_function("() => { const o = document.getElementById('overlay');"
                           " return (o.complete && o.naturalWidth > 0) || !document.getElementById('error').hidden; }",
                           timeout=120_000)


def test_viewer_cross_origin_image_and_text(browser, viewer_origin, open_server, star_png):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page()
    page.goto(f"{viewer_origin}/index.html")

    fill_request(page, open_server.inference_url, "shapes", method="gradcam")
    explain_image(page, star_png)
    assert page.is_hidden("#error"), page.text_content("#error")
    labels = page.eval_on_selector_all("#predictions tbody td.label", "cells => cells.map(c => c.textContent)")
    status, raw = open_server.request("POST", f"{open_server.inference_url}/predictions/shapes", star_png[0].read_bytes())
    assert status == 200 and labels == list(json.loads(raw)) and labels[0] == "star"
    assert "Explained: star (method gradcam" in page.text_content("#explained")
    natural = page.evaluate("() => [overlay.naturalWidth, overlay.naturalHeight]")
    assert tuple(natural) == star_png[1]  # the overlay is drawn on the original image, at its size
    page.screenshot(path=str(SCREENSHOTS / "image.png"), full_page=True)

    page.check("#kind-text")
    page.fill("#text", REVIEW)
    fill_request(page, open_server.inference_url, "reviews", method="layer_ig", n_steps="32")
    page.click("#explain")
    page.wait_for_selector("#words span.word", timeout=120_000)
    assert page.text_content("#words") == REVIEW  # the text itself, words highlighted in place
    shown = page.eval_on_selector_all("#words span.word",
                                      "spans => spans.map(s => [s.textContent, parseFloat(s.dataset.attribution)])")
    status, raw = open_server.request("POST", f"{open_server.inference_url}/explanations/reviews",
                                      json.dumps({"data": REVIEW, "method": "layer_ig", "n_steps": 32}).encode(),
                                      {"Content-Type": "application/json"})
    explanation = json.loads(raw)["explanation"]
    words = sorted(explanation["words"], key=lambda w: w["start"])
    assert [w for w, _ in shown] == [REVIEW[w["start"]:w["end"]] for w in words]
    assert [a for _, a in shown] == pytest.approx([w["attribution"] for w in words], rel=1e-3, abs=1e-6)
    strongest = max(shown, key=lambda s: s[1])[0]
    assert strongest == explanation["top_words"][0]["word"]
    delta_text = page.text_content("#delta")
    value = float(re.search(r"convergence delta\): ([0-9.e+-]+)", delta_text).group(1))
    assert value == pytest.approx(explanation["convergence_delta"]["absolute"], rel=1e-2, abs=1e-9)
    label = page.text_content("#predictions tbody td.label")
    assert label == json.loads(raw)["predictions"][0]["label"]
    page.screenshot(path=str(SCREENSHOTS / "text.png"), full_page=True)

    # a method the model does not have: the server's error is shown
    fill_request(page, open_server.inference_url, "reviews", method="gradcam")
    page.click("#explain")
    page.wait_for_selector("#error", state="visible", timeout=60_000)
    assert "400 unknown_method" in page.text_content("#error")
    assert page.is_hidden("#words")
    page.close()


def test_viewer_same_origin_with_token_authorization(browser, viewer_origin, guarded_server, star_png):
    # TorchServe 0.12 checks its token on the CORS preflight: cross-origin cannot work with tokens on.
    status, _ = guarded_server.request("OPTIONS", f"{guarded_server.inference_url}/explanations/shapes", None,
                                       {"Origin": viewer_origin, "Access-Control-Request-Method": "POST",
                                        "Access-Control-Request-Headers": "authorization,content-type",
                                        "Authorization": ""})
    assert status == 400
    page = browser.new_page()
    page.goto(f"{viewer_origin}/index.html")
    page.fill("#key", guarded_server.key("inference"))
    fill_request(page, guarded_server.inference_url, "shapes")
    explain_image(page, star_png)
    assert "Cannot reach" in page.text_content("#error")

    proxy, proxy_url = serve_viewer(api=guarded_server.inference_url)
    try:
        page.goto(f"{proxy_url}/index.html")
        fill_request(page, "", "shapes", target="star")  # empty URL: the page's own origin
        page.fill("#key", "wrong-key")
        explain_image(page, star_png)
        assert "HTTP 400" in page.text_content("#error")  # TorchServe's answer to a wrong key

        page.fill("#key", guarded_server.key("inference"))
        page.click("#explain")
        page.wait_for_function("() => overlay.complete && overlay.naturalWidth > 0", timeout=120_000)
        assert page.is_hidden("#error")
        assert page.text_content("#predictions tbody td.label") == "star"
        page.screenshot(path=str(SCREENSHOTS / "same-origin.png"), full_page=True)
    finally:
        proxy.shutdown()
        page.close()
