#!/usr/bin/env bash
# Download the wheels the GPU machine lacks into .whl/ at the repo root (run here, with network),
# for benchmarks/gpu_suite.sh to install offline there (carry .whl with the call).
#
#   bash benchmarks/fetch_wheels.sh            # -> .whl/ (WHEEL_DIR=... for another folder)
#
# The GPU image (Python 3.12, torch 2.11, triton 3.6; see the device notes) already has numpy,
# packaging, einops, pyyaml, psutil, pillow, tokenizers, sentencepiece, transformers, pytest and
# matplotlib. It lacks megatron-core, whose own requirements (torch, numpy, packaging) it has:
# megatron-core is the one wheel (cp312, ~2.6 MB). Add a name to WHEELS if the image changes.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${WHEEL_DIR:-$REPO/.whl}"
PY="${PYTHON:-python3}"
WHEELS=("megatron-core==0.16.1")

mkdir -p "$DEST"
if [ "$DEST" = "$REPO/.whl" ] && [ -d "$REPO/.git/info" ] && \
        ! grep -qx '/.whl/' "$REPO/.git/info/exclude" 2>/dev/null; then
    echo /.whl/ >>"$REPO/.git/info/exclude"  # never committed, still carried when named
fi
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"
ls -l "$DEST"
