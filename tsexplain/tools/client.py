"""A small client for the ``/explanations`` endpoint, and the ``tsexplain-client`` command.

Standard library only (no TorchServe, no Pillow)::

    tsexplain-client explain --model shapes star.png --out overlay.png
    tsexplain-client explain --model reviews --text "never horrible, honestly"

The inference key is read from TorchServe's ``key_file.json`` (``inference.key``),
the explanation token from a file or an environment variable; request options
(``--target``, ``--method``, ``--contrast``, ``--n-steps``, ``--option key=value``)
are passed to the server as they are, so a model that does not support one answers
with its own error, which the command prints.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import struct
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping, Optional

from ..serving.schema import IMAGE_OUTPUTS

DEFAULT_URL = "http://127.0.0.1:8080"
TOKEN_HEADER = "X-Explain-Token"


class ServerError(Exception):
    """The server answered with an error status; ``body`` is its JSON error when it sent one."""

    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        if isinstance(body, dict) and "message" in body:
            text = f"{status} {body.get('type', 'error')}: {body['message']}"
        else:
            text = f"{status}: {str(body)[:300]}"
        super().__init__(text)


def load_inference_key(key_file: os.PathLike) -> str:
    """``inference.key`` from TorchServe's ``key_file.json``."""
    keys = json.loads(Path(key_file).read_text())
    try:
        return keys["inference"]["key"]
    except (KeyError, TypeError):
        raise ValueError(f"{key_file} has no inference key (expected TorchServe's key_file.json)") from None


class ExplainClient:
    """Calls ``/explanations/{model}`` and ``/predictions/{model}`` of one TorchServe.

    Args:
        url: the inference API, e.g. ``http://127.0.0.1:8080``.
        key: TorchServe's inference key (sent as ``Authorization: Bearer``), or ``None``.
        token: the explanation token (``X-Explain-Token``), or ``None``.
        priority: a priority value sent in ``priority_header``, or ``None``.
    """

    def __init__(self, url: str = DEFAULT_URL, key: Optional[str] = None, token: Optional[str] = None,
                 priority: Optional[str] = None, priority_header: str = "X-Priority", timeout: float = 120):
        self.url = url.rstrip("/")
        self.headers = {}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        if token:
            self.headers[TOKEN_HEADER] = token
        if priority:
            self.headers[priority_header] = priority
        self.timeout = timeout

    def explain(self, model: str, data: bytes | str, **options: Any) -> dict:
        """The explanation of ``data`` (image bytes, or text) with request ``options``
        (``target``, ``method``, ``outputs``, ``n_steps``, ...; ``None`` values are left out)."""
        payload = {"data": base64.b64encode(data).decode("ascii") if isinstance(data, bytes) else data}
        payload.update({k: v for k, v in options.items() if v is not None})
        return self._post(f"/explanations/{model}", json.dumps(payload).encode(), "application/json")

    def predict(self, model: str, data: bytes | str) -> dict:
        """The plain prediction (``{label: probability}``) of ``data``."""
        if isinstance(data, str):
            return self._post(f"/predictions/{model}", data.encode("utf-8"), "text/plain; charset=utf-8")
        return self._post(f"/predictions/{model}", data, "application/octet-stream")

    def _post(self, path: str, body: bytes, content_type: str) -> dict:
        request = urllib.request.Request(self.url + path, data=body, method="POST",
                                         headers={**self.headers, "Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read())
                streamed = response.headers.get("ts_stream_next") is not None
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
            raise ServerError(error.code, body) from None
        if streamed and isinstance(answer, dict) and isinstance(answer.get("code"), int) and "message" in answer:
            raise ServerError(answer["code"], answer)  # an early-answered batch: the status went out as 200
        return answer


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return struct.unpack(">II", png[16:24])


def save_overlay(response: Mapping, path: os.PathLike) -> tuple[int, int]:
    """Write the response's ``overlay_png`` to ``path``; returns its (width, height)."""
    encoded = (response.get("explanation") or {}).get("overlay_png")
    if not encoded:
        raise ValueError("the response has no overlay_png")
    png = base64.b64decode(encoded)
    size = png_size(png)
    Path(path).write_bytes(png)
    return size


# 256-colour backgrounds, weakest to strongest: green for evidence for the target, red against.
_GREENS = (194, 157, 120, 77, 34)
_REDS = (224, 217, 210, 203, 160)


def highlight_words(text: str, words: list, color: bool = True, top: int = 3) -> str:
    """``text`` with each word's background coloured by its attribution (``color``),
    or, without colour, the ``top`` words by |attribution| marked ``[+word]``/``[-word]``."""
    peak = max((abs(w["attribution"]) for w in words), default=0.0) or 1.0
    strongest = {id(w) for w in sorted(words, key=lambda w: -abs(w["attribution"]))[:top]}
    out, position = [], 0
    for word in sorted(words, key=lambda w: w["start"]):
        start, end, value = word["start"], word["end"], word["attribution"]
        if start < position:
            continue
        out.append(text[position:start])
        piece = text[start:end]
        if color:
            level = min(len(_GREENS) - 1, int(abs(value) / peak * len(_GREENS)))
            if abs(value) / peak < 0.05:
                out.append(piece)
            else:
                code = (_GREENS if value > 0 else _REDS)[level]
                out.append(f"\x1b[48;5;{code}m\x1b[30m{piece}\x1b[0m")
        elif id(word) in strongest:
            out.append(f"[{'+' if value >= 0 else '-'}{piece}]")
        else:
            out.append(piece)
        position = end
    out.append(text[position:])
    return "".join(out)


def use_color(mode: str, stream) -> bool:
    """``always``/``never``, or ``auto``: a terminal and no ``NO_COLOR`` (https://no-color.org)."""
    if mode != "auto":
        return mode == "always"
    return not os.environ.get("NO_COLOR") and hasattr(stream, "isatty") and stream.isatty()


def _value(text: str) -> Any:
    """A command-line value as JSON when it parses (``3``, ``true``, ``["a"]``), else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsexplain-client", description="Ask TorchServe for an explanation.")
    commands = parser.add_subparsers(dest="command", required=True)
    ex = commands.add_parser("explain", help="explain an image or a text")
    ex.add_argument("image", nargs="?", help="an image file")
    ex.add_argument("--model", "-m", required=True, help="the model name")
    ex.add_argument("--text", help="a text to explain (instead of an image)")
    ex.add_argument("--text-file", help="a UTF-8 file holding the text to explain")
    ex.add_argument("--out", "-o", help="image: save the overlay PNG here")
    ex.add_argument("--target", help='class index, label or "predicted" (default: the server\'s)')
    ex.add_argument("--method", help="explanation method (gradcam, layer_ig, ...)")
    ex.add_argument("--contrast", help="contrast class, for the methods that take one")
    ex.add_argument("--n-steps", type=int, help="integration steps (text)")
    ex.add_argument("--top-k", type=int, help="predictions (image) or top words (text) to list")
    ex.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="any other request field (the value is read as JSON when it parses); repeatable")
    ex.add_argument("--priority", help="priority value to send (e.g. audit)")
    ex.add_argument("--priority-header", default="X-Priority")
    token = ex.add_mutually_exclusive_group()
    token.add_argument("--token-file", help="file holding the explanation token (X-Explain-Token)")
    token.add_argument("--token-env", help="environment variable holding the explanation token")
    ex.add_argument("--key-file", default="key_file.json",
                    help="TorchServe's key_file.json (default: ./key_file.json; no key sent when it is absent)")
    ex.add_argument("--url", default=os.environ.get("TSEXPLAIN_URL", DEFAULT_URL), help="inference API URL")
    ex.add_argument("--json", action="store_true", help="print the server's JSON answer as it is")
    ex.add_argument("--color", choices=["auto", "always", "never"], default="auto", help="colour the text output")
    ex.add_argument("--timeout", type=float, default=120)
    return parser


def _token(args) -> Optional[str]:
    if args.token_file:
        return Path(args.token_file).read_text().strip()
    if args.token_env:
        value = os.environ.get(args.token_env)
        if not value:
            raise SystemExit(f"error: environment variable {args.token_env} is not set")
        return value.strip()
    return None


def main(argv: Optional[list] = None) -> int:
    args = _parser().parse_args(argv)
    sources = [s for s in (args.image, args.text, args.text_file) if s is not None]
    if len(sources) != 1:
        print("error: give one of: an image file, --text or --text-file", file=sys.stderr)
        return 2
    key = None
    if Path(args.key_file).exists():
        key = load_inference_key(args.key_file)
    elif args.key_file != "key_file.json":
        print(f"error: key file {args.key_file} not found", file=sys.stderr)
        return 2
    client = ExplainClient(args.url, key, _token(args), args.priority, args.priority_header, args.timeout)

    options = {"target": _value(args.target) if args.target is not None else None, "method": args.method,
               "contrast": _value(args.contrast) if args.contrast is not None else None,
               "n_steps": args.n_steps, "top_k": args.top_k}
    for item in args.option:
        name, sep, value = item.partition("=")
        if not sep or not name:
            print(f"error: --option {item!r} is not KEY=VALUE", file=sys.stderr)
            return 2
        options[name] = _value(value)
    if args.image is not None:
        data: bytes | str = Path(args.image).read_bytes()
        if args.out and "outputs" not in options:
            options["outputs"] = list(IMAGE_OUTPUTS)  # every output: the heatmap and the overlay
    else:
        data = args.text if args.text is not None else Path(args.text_file).read_text(encoding="utf-8")

    try:
        response = client.explain(args.model, data, **options)
    except ServerError as error:
        if args.json:
            print(json.dumps(error.body))
        print(f"error: the server answered {error}", file=sys.stderr)
        return 1
    except urllib.error.URLError as error:
        print(f"error: cannot reach {args.url}: {error.reason}", file=sys.stderr)
        return 1

    if args.json:
        print(json.dumps(response, ensure_ascii=False))
    else:
        _print_summary(response, data if isinstance(data, str) else None, use_color(args.color, sys.stdout))
    if args.out:
        try:
            width, height = save_overlay(response, args.out)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"overlay saved to {args.out} ({width}x{height})", file=sys.stderr if args.json else sys.stdout)
    return 0


def _print_summary(response: dict, text: Optional[str], color: bool) -> None:
    for p in response.get("predictions", [])[:5]:
        print(f"{p['probability']:8.4f}  {p['label']}")
    explanation = response.get("explanation")
    if explanation is None:
        print(f"no explanation: {response.get('explanation_skipped', 'none returned')}")
        return
    target = explanation.get("target", {})
    print(f"explained: {target.get('label')} (method {explanation.get('method')}, {explanation.get('elapsed_ms')} ms)")
    if explanation.get("explanation_id"):  # the audit trail's record of it: tsexplain-audit show ID
        print(f"explanation id: {explanation['explanation_id']}")
    if text is not None and "words" in explanation:
        print(highlight_words(text, explanation["words"], color))
        top = ", ".join(f"{w['word']} {w['attribution']:+.3f}" for w in explanation.get("top_words", []))
        print(f"top words: {top}")
    delta = explanation.get("convergence_delta")
    if delta:
        print(f"convergence delta: {delta.get('absolute'):.3g} (relative {delta.get('relative'):.3g})")


if __name__ == "__main__":
    sys.exit(main())
