#!/usr/bin/env python
"""Readiness check of the image (`torchserve-explain-ready`, a Kubernetes exec probe): exits 0 when
TorchServe's GET /ping answers 200 "Healthy". TorchServe 0.12 asks for the inference key on /ping too
when token authorization is on (without it: 400), so the key is read from key_file.json in the working
directory when there is one; with token authorization off there is none and no key is sent."""
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

URL = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080/ping"


def main() -> int:
    headers = {}
    key_file = Path("key_file.json")
    if key_file.exists():
        try:
            headers["Authorization"] = f"Bearer {json.loads(key_file.read_text())['inference']['key']}"
        except (ValueError, KeyError, TypeError):
            return 1  # being written: not ready yet
    try:
        with urllib.request.urlopen(urllib.request.Request(URL, headers=headers), timeout=5) as response:
            healthy = response.status == 200 and json.load(response).get("status") == "Healthy"
    except (OSError, ValueError):
        return 1
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
