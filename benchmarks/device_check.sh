#!/usr/bin/env bash
# The accelerator check of issue 19 (benchmarks/device_check.py; figures go to benchmarks/RESULTS.md):
# ViLReF's and FLAIR's paper steps on one H200 (step time, MFU, memory, remat) and open_clip's
# ViT-B-16 step on the same GPU, in at most 8 minutes.
#
# The H200 image has jax 0.11 (CUDA), flax, optax, orbax, torch, torchvision, timm, transformers and
# tokenizers, but not grain, ml_collections, simplejpeg or open_clip, and nothing can be downloaded there. So:
#   here (with PyPI):  benchmarks/device_check.sh fetch     # wheels for Python 3.12 into .whl/
#   there:             benchmarks/device_check.sh run OUT   # installs .whl/ to /tmp/site, writes OUT/device_check.json
# (with the session's `run` tool: carry [".whl"], command `benchmarks/device_check.sh run $OUT`).
set -euo pipefail
cd "$(dirname "$0")/.."

# Missing on the H200 image, pinned as in requirements.txt where the project pins them; the rest are
# their dependencies that the image lacks (each `Requires-Dist` checked against the image's list).
WHEELS=(grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml_collections==1.1.0 simplejpeg==1.9.0
        open_clip_torch==2.24.0 ftfy==6.3.1 wcwidth==0.2.13)

case "${1:-}" in
  fetch)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    ls -l .whl ;;
  run)
    out="${2:?usage: $0 run OUT_DIR}"
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
    timeout 480 python3 benchmarks/device_check.py --out "$out/device_check.json" 2>&1 | tee "$out/device_check.log" ;;
  *)
    echo "usage: $0 fetch | run OUT_DIR" >&2
    exit 2 ;;
esac
