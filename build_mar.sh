#!/usr/bin/env bash
# Builds self-contained .mar files into model_store/ (see: ./build_mar.sh --help).
#   ./build_mar.sh demo
#   ./build_mar.sh image --name NAME --architecture resnet50 --weights w.pt --labels index_to_name.json [--config c.yaml]
#   ./build_mar.sh image --name NAME --architecture resnet50 --pretrained ResNet50_Weights.IMAGENET1K_V2 --labels ...
#   ./build_mar.sh text  --name NAME --model-dir path/to/save_pretrained_dir [--config c.yaml]
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
exec "$PY" scripts/build_mar.py "$@"
