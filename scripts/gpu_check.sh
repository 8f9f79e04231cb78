#!/usr/bin/env bash
# One-GPU check (issue 11): the stage x mode x input matrix on CUDA in bf16 and 4-bit (bitsandbytes' CUDA
# kernels), then a Qwen2-0.5B-shaped model through sft, dpo and ppo (single-GPU mode) at sequence length 1024.
# Prints one table (stage, mode, input, ok, peak GPU memory, tokens/s) in under 8 minutes on one H100/H200.
# Nothing is downloaded: every model is built from config. Uses the machine's Python packages, plus wheels
# in .whl/ when present (see the device notes in the README).
#
#   scripts/gpu_check.sh                 # OUT=DIR to keep gpu_check.md / gpu_check.json
#   scripts/gpu_check.sh --limit 10      # any option of scripts/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dpo-cli-site .whl/*.whl
    export PYTHONPATH=/tmp/dpo-cli-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}  # the project itself, without an install step that could reach the network
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 480 "$PYTHON" scripts/gpu_check.py --out "${OUT:-/tmp/dpo-cli-gpu-check}" "$@"
