#!/usr/bin/env bash
# Builds self-contained, checked .mar files (see: ./build_mar.sh --help, README "Packaging your own models").
#   ./build_mar.sh demo
#   ./build_mar.sh image --name NAME --architecture resnet50 --weights w.pt --labels index_to_name.json [--config c.yaml]
#   ./build_mar.sh image --name NAME --model-file model.py --weights w.pt --labels index_to_name.json
#   ./build_mar.sh image --name NAME --timm convnext_tiny --weights w.pt --labels index_to_name.json
#   ./build_mar.sh image --name NAME --hf-model-dir path/to/save_pretrained_dir
#   ./build_mar.sh image --name NAME --torchscript model.pt --labels index_to_name.json
#   ./build_mar.sh text  --name NAME --model-dir path/to/save_pretrained_dir [--config c.yaml]
#   ./build_mar.sh code --out DIR        # handler code for torch-model-archiver by hand
#   ./build_mar.sh check model.mar       # load and explain any MAR as a worker would
# Paths are relative to the current directory.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="$HERE/.venv/bin/python"; [ -x "$PY" ] || PY=python3
exec "$PY" "$HERE/scripts/build_mar.py" "$@"
