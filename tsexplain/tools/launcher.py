"""Start and stop a real TorchServe on loopback ports (demo, tests, benchmarks).

Runs the ``torchserve`` command line in its own working directory, so its
``key_file.json`` and logs stay there, and waits until every model has a READY
worker. Uses only the standard library.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import http.client
import urllib.parse
from pathlib import Path
from typing import Mapping, Optional, Sequence


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchserve_command() -> str:
    beside_python = Path(sys.executable).parent / "torchserve"
    return str(beside_python) if beside_python.exists() else "torchserve"


class TorchServe:
    """A TorchServe instance serving ``models`` ({name: mar file}) from ``model_store``.

    ``properties`` are extra ``config.properties`` lines; ``env`` extra environment
    variables for the frontend and its workers. Use as a context manager.
    """

    def __init__(
        self,
        model_store: os.PathLike,
        models: Mapping[str, str],
        workdir: os.PathLike,
        properties: Optional[Mapping[str, str]] = None,
        env: Optional[Mapping[str, str]] = None,
        ports: Optional[Sequence[int]] = None,
    ):
        self.model_store = Path(model_store).resolve()
        self.models = dict(models)
        self.workdir = Path(workdir).resolve()
        self.properties = dict(properties or {})
        self.env = dict(env or {})
        self.inference_port, self.management_port, self.metrics_port = ports or (free_port(), free_port(), free_port())
        self.inference_url = f"http://127.0.0.1:{self.inference_port}"
        self.management_url = f"http://127.0.0.1:{self.management_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}"
        self.keys: dict = {}
        # TorchServe also opens gRPC servers (default ports 7070/7071): free ports too, so
        # that several instances can run side by side.
        self.grpc_ports = (free_port(), free_port())

    def config_text(self) -> str:
        lines = {
            "inference_address": self.inference_url,
            "management_address": self.management_url,
            "metrics_address": self.metrics_url,
            "model_store": str(self.model_store),
            "load_models": ",".join(f"{name}={mar}" for name, mar in self.models.items()),
            # TorchServe also opens gRPC ports (7070, 7071 by default): free ones, so that
            # several instances can run side by side.
            "grpc_inference_port": str(self.grpc_ports[0]),
            "grpc_management_port": str(self.grpc_ports[1]),
            "default_workers_per_model": "1",
            "model_metrics_auto_detect": "true",  # keep the handlers' custom metrics
            **self.properties,
        }
        return "".join(f"{key}={value}\n" for key, value in lines.items())

    def start(self, timeout: float = 300) -> "TorchServe":
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "config.properties").write_text(self.config_text())
        # a restart in the same folder writes new keys: never wait with the last start's
        (self.workdir / "key_file.json").unlink(missing_ok=True)
        self.keys = {}
        with open(self.workdir / "torchserve.out", "wb") as out:
            subprocess.run(
                [torchserve_command(), "--start", "--ncs", "--ts-config", "config.properties",
                 "--model-store", str(self.model_store)],
                cwd=self.workdir, env=self._environ(), stdout=out, stderr=subprocess.STDOUT, check=True, timeout=120,
            )
        try:
            self.wait_ready(timeout)
        except Exception:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        key_file = self.workdir / "key_file.json"
        while time.monotonic() < deadline:
            if key_file.exists() and not self.keys:
                try:
                    self.keys = json.loads(key_file.read_text())
                except json.JSONDecodeError:
                    pass
            token_auth = str(self.properties.get("disable_token_authorization", "false")).lower() != "true"
            if (self.keys or not token_auth) and all(self.model_ready(name) for name in self.models):
                return
            time.sleep(0.5)
        raise TimeoutError(f"TorchServe not ready after {timeout}s; see {self.workdir / 'logs'}")

    def key(self, api: str) -> Optional[str]:
        """The token of ``api`` (``inference``, ``management``) from key_file.json."""
        entry = self.keys.get(api) or {}
        return entry.get("key")

    def model_ready(self, name: str) -> bool:
        """True once ``name`` has a READY worker; any other answer means not yet."""
        try:
            status, body = self.request("GET", f"{self.management_url}/models/{name}", api="management")
            workers = json.loads(body)[0]["workers"] if status == 200 else []
        except (OSError, ValueError, LookupError, TypeError):
            return False
        return any(isinstance(w, dict) and w.get("status") == "READY" for w in workers)

    def request(self, method: str, url: str, data: bytes | None = None, headers: Optional[Mapping[str, str]] = None,
                api: str = "inference", timeout: float = 60) -> tuple[int, bytes]:
        """One HTTP call with the API's token; returns (status, body), 4xx/5xx included.

        Header names are sent exactly as given (``http.client`` keeps their case).
        """
        all_headers = dict(headers or {})
        token = self.key(api)
        if token and not any(k.lower() == "authorization" for k in all_headers):
            all_headers["Authorization"] = f"Bearer {token}"
        if data is not None and not any(k.lower() == "content-type" for k in all_headers):
            all_headers["Content-Type"] = "application/octet-stream"  # not a form encoding
        parts = urllib.parse.urlsplit(url)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        try:
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            connection.request(method, path, body=data, headers=all_headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def _environ(self) -> dict:
        # TorchServe keeps its pid file (TMPDIR) and worker sockets (TEMP) in temp
        # dirs: one per instance lets several run side by side (demo and tests).
        tmp = self.workdir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return {**os.environ, "TMPDIR": str(tmp), "TEMP": str(tmp), "LOG_LOCATION": str(self.workdir / "logs"),
                "METRICS_LOCATION": str(self.workdir / "logs"), **self.env}

    def stop(self) -> None:
        subprocess.run([torchserve_command(), "--stop"], cwd=self.workdir, env=self._environ(),
                       capture_output=True, timeout=120)

    def __enter__(self) -> "TorchServe":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_text(self) -> str:
        """The model workers' log (for assertions on what was logged)."""
        path = self.workdir / "logs" / "model_log.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def output_files(self) -> dict[str, str]:
        """Everything this TorchServe wrote as text: each file under ``logs/``
        (ts_log, model_log, access_log, model_metrics, ts_metrics...) and
        ``torchserve.out``, the stdout and stderr of ``torchserve --start`` and of the
        frontend it started, which inherits them (``{relative path: text}``)."""
        paths = [p for p in (self.workdir / "logs").rglob("*") if p.is_file()]
        paths.append(self.workdir / "torchserve.out")
        return {str(p.relative_to(self.workdir)): p.read_text(errors="replace") for p in paths if p.exists()}



def main(argv=None) -> None:
    """``python -m tsexplain.tools.launcher wait``: wait for a started TorchServe's models."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("action", choices=["wait"])
    parser.add_argument("--workdir", default=".", help="where torchserve was started (holds key_file.json)")
    parser.add_argument("--inference-port", type=int, default=8080)
    parser.add_argument("--management-port", type=int, default=8081)
    parser.add_argument("--models", required=True, help="comma-separated model names")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args(argv)
    server = TorchServe(".", {m: "" for m in args.models.split(",")}, args.workdir,
                        ports=(args.inference_port, args.management_port, 0))
    server.wait_ready(args.timeout)
    print(f"ready: {args.models}")


if __name__ == "__main__":
    main()
