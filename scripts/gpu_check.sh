#!/usr/bin/env bash
# One-GPU check (issue 11): the stage x mode x input matrix on CUDA in bf16 and 4-bit (bitsandbytes' CUDA
# kernels), then a Qwen2-0.5B-shaped model through sft, dpo and ppo (single-GPU mode) at sequence length 1024.
# Prints one table (stage, mode, input, ok, peak GPU memory, tokens/s) in about 6 minutes on one H100/H200,
# then dpo-cli against TRL (sft, dpo at TRL's default) on that 0.5B shape at sequence length 1024 in bf16:
# tokens/s, MFU against the GPU's measured bf16 matmul peak, peak memory (benchmarks/bench.py, one paired run).
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
timeout 330 "$PYTHON" scripts/gpu_check.py --out "${OUT:-/tmp/dpo-cli-gpu-check}" "$@" || echo "gpu_check.py: exit $?"
exec timeout 230 "$PYTHON" benchmarks/bench.py --shape qwen2.5-0.5b --precision bf16 --workloads gpu --repeats 1 \
    --only "sft,dpo vs TRL default" --out "${OUT:-/tmp/dpo-cli-gpu-check}/bench.json"
