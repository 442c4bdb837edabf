#!/usr/bin/env bash
# Command 2: the whole test suite (sets up .venv, trains the demo models if not
# cached), then runs pytest; server tests build the demo MARs from the current
# code and start their own TorchServe on free loopback ports. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/scripts/setup_env.sh"
python -m demo.train_shapes --out build/demo/shapes
python -m demo.train_reviews --out build/demo/reviews
python -m pytest "$@"
