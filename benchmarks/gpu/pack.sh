#!/usr/bin/env bash
# Here (CPU machine, network to PyPI), from the project root: what the GPU machine needs.
#   .gpukit/           ../shared/gpu-kit/pack: a trimmed Java, TorchServe, the archiver, captum
#   .gpukit/optional/  torchvision and Pillow wheels for Python 3.12, installed there only when
#                      that machine's Python lacks them (its torch must then be 2.14.1)
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
"$root/../shared/gpu-kit/pack"
mkdir -p .gpukit/optional
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 -d .gpukit/optional torchvision==0.29.1 pillow==11.3.0
du -sh .gpukit
