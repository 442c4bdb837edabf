#!/usr/bin/env bash
# Command 1: set up, train the demo models (cached after the first run), build
# their MARs and serve them with `torchserve --start` on 127.0.0.1:8080-8082.
set -euo pipefail
source "$(dirname "$0")/scripts/setup_env.sh"
python -m demo.train_shapes --out build/demo/shapes
python -m demo.train_reviews --out build/demo/reviews
./build_mar.sh demo
python -m demo.make_examples --out build/examples
torchserve --stop >/dev/null 2>&1 || true
torchserve --start --ncs --ts-config config.properties >build/torchserve.out 2>&1
python -m tsexplain.tools.launcher wait --models shapes,reviews --timeout 300
KEY=$(python -c "import json; print(json.load(open('key_file.json'))['inference']['key'])")
cat <<MSG

TorchServe is serving the demo models on http://127.0.0.1:8080 (stop it with: .venv/bin/torchserve --stop).
The inference key is in key_file.json. Try (ready to paste):

curl -s -H "Authorization: Bearer $KEY" -T build/examples/star.png http://127.0.0.1:8080/predictions/shapes

curl -s -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" -o build/explanation.json \\
  -d "{\\"data\\": \\"\$(base64 -w0 build/examples/star.png)\\", \\"outputs\\": [\\"heatmap\\", \\"overlay_png\\"]}" \\
  http://127.0.0.1:8080/explanations/shapes && head -c 600 build/explanation.json; echo
python3 -c "import json, base64; e = json.load(open('build/explanation.json'))['explanation']; open('build/overlay.png', 'wb').write(base64.b64decode(e['overlay_png']))"  # then open build/overlay.png

curl -s -H "Authorization: Bearer $KEY" -H "Content-Type: text/plain" --data-binary @build/examples/review.txt http://127.0.0.1:8080/explanations/reviews
MSG
