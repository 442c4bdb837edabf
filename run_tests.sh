#!/usr/bin/env bash
# Command 2: the whole test suite (sets up .venv, trains the demo models if not
# cached, builds their MARs, then runs pytest; server tests start their own
# TorchServe on free loopback ports). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/scripts/setup_env.sh"
python -m demo.train_shapes --out build/demo/shapes
python -m demo.train_reviews --out build/demo/reviews
./build_mar.sh demo --export-path build/test_model_store
python -m pytest "$@"
