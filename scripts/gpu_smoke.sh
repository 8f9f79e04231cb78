#!/usr/bin/env bash
# Multi-GPU smoke test of every engine: DDP (the whole demo pipeline), FSDP, FSDP + QLoRA and DeepSpeed
# ZeRO-2/3 with and without CPU offload (sft and dpo each). Not part of CI: it needs a CUDA machine with 2+
# GPUs (DeepSpeed runs are skipped when `import deepspeed` fails). Offline: the demo builds its own model.
#
#   scripts/gpu_smoke.sh [OUT_DIR]          # default /tmp/dpo-cli-gpu-smoke; N=4 scripts/gpu_smoke.sh for 4 GPUs
#   scripts/gpu_smoke.sh --dry-run          # print the commands only
#
# Each line of the summary is PASS, FAIL (with its log) or SKIP; the exit status is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:-/tmp/dpo-cli-gpu-smoke}
PYTHON=${PYTHON:-python}
if [ "$DRY" = 0 ]; then
    GPUS=$($PYTHON -c "import torch; print(torch.cuda.device_count())")
    if [ "$GPUS" -lt 2 ]; then echo "gpu_smoke: needs 2 or more CUDA GPUs, found $GPUS"; exit 2; fi
fi
N=${N:-2}
mkdir -p "$OUT"
SUMMARY=()

launch() {  # launch NAME CONFIG STAGE RECIPE [dpo-cli options]
    local name=$1 config=$2; shift 2
    local command=("$PYTHON" -m accelerate.commands.launch --config_file "recipes/accelerate/$config.yaml" --num_processes "$N" -m dpo_cli "$@")
    echo "== $name: ${command[*]}"
    if [ "$DRY" = 1 ]; then SUMMARY+=("DRY  $name"); return; fi
    if "${command[@]}" > "$OUT/$name.log" 2>&1; then SUMMARY+=("PASS $name"); else SUMMARY+=("FAIL $name (log: $OUT/$name.log)"); fi
}

# 1. DDP: every stage of both paths, as `make demo` runs them (capped by --smoke).
launch ddp-pipeline ddp pipeline recipes/demo/pipeline.yaml --smoke --run-dir "$OUT/demo"
DEMO=$OUT/demo-smoke
FROM_PRETRAIN=(--smoke --set "model.name_or_path=$DEMO/pretrain")
FROM_SFT=(--smoke --set "model.name_or_path=$DEMO/sft" --set "data.train=$DEMO/collect-prefs")

# 2. The sharded engines on sft (full weights) and dpo (LoRA), from the pipeline's runs.
HAS_DEEPSPEED=1
$PYTHON -c "import deepspeed" > /dev/null 2>&1 || HAS_DEEPSPEED=0
for config in fsdp-full-shard deepspeed-zero2 deepspeed-zero2-offload deepspeed-zero3 deepspeed-zero3-offload; do
    case $config in
        fsdp-full-shard) engine=(--set distributed.strategy=fsdp) ;;
        deepspeed-zero2) engine=(--set distributed.strategy=deepspeed --set distributed.zero_stage=2) ;;
        deepspeed-zero2-offload) engine=(--set distributed.strategy=deepspeed --set distributed.zero_stage=2 --set distributed.zero_offload=true) ;;
        deepspeed-zero3) engine=(--set distributed.strategy=deepspeed --set distributed.zero_stage=3) ;;
        deepspeed-zero3-offload) engine=(--set distributed.strategy=deepspeed --set distributed.zero_stage=3 --set distributed.zero_offload=true) ;;
    esac
    if [ "${config#deepspeed}" != "$config" ] && [ "$HAS_DEEPSPEED" = 0 ] && [ "$DRY" = 0 ]; then
        SUMMARY+=("SKIP $config (pip install deepspeed)")
        continue
    fi
    launch "sft-$config" "$config" sft recipes/demo/sft.yaml --run-dir "$OUT/sft-$config" "${FROM_PRETRAIN[@]}" "${engine[@]}"
    launch "dpo-$config" "$config" dpo recipes/demo/dpo.yaml --run-dir "$OUT/dpo-$config" "${FROM_SFT[@]}" "${engine[@]}" --set model.lora.r=8
done

# 3. FSDP + QLoRA: a 4-bit base stored in bfloat16, sharded with its LoRA adapters.
QLORA=(--set model.dtype=bfloat16 --set model.lora.r=8 --set model.quantization.compute_dtype=bfloat16
       --set model.quantization.quant_storage=bfloat16 --set distributed.strategy=fsdp)
launch sft-fsdp-qlora fsdp-qlora sft recipes/demo/sft.yaml --run-dir "$OUT/sft-fsdp-qlora" "${FROM_PRETRAIN[@]}" "${QLORA[@]}"

echo
echo "gpu_smoke on $N processes ($OUT):"
failed=0
for line in "${SUMMARY[@]}"; do
    echo "  $line"
    case $line in FAIL*) failed=1 ;; esac
done
exit $failed
