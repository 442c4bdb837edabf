#!/usr/bin/env bash
# On the GPU machine, from the project root (where the device tool starts), with .gpukit/ carried:
#   bash benchmarks/gpu/run.sh            # resnet50 and bert-base, results in $OUT/bench-gpu/
#   MODELS=resnet50 bash benchmarks/gpu/run.sh
set -euo pipefail
source .gpukit/setup.sh
if ! python3 -c "import torchvision, PIL" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/gpukit/optional .gpukit/optional/*.whl
  export PYTHONPATH=/tmp/gpukit/optional:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
out=${OUT:-build}/bench-gpu
python3 -m benchmarks.run --profile gpu --models "${MODELS:-resnet50,bert-base}" --out "$out" --workdir /tmp/bench-work
cp /tmp/bench-work/ts-*/logs/model_log.log "$out/" 2>/dev/null || true
