#!/usr/bin/env bash
# Builds the container image with podman where no registry is reachable (see: ./build_image.sh --help).
#   ./build_image.sh build                      # base image from Debian's packages (cached), then the Dockerfile
#   ./build_image.sh build --model-store DIR --tag localhost/torchserve-explain:0.1.0
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
exec "$PY" scripts/image.py "$@"
