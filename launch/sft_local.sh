#!/usr/bin/env bash
# The main job on one machine: installs what is missing, builds, generates a
# tiny random Qwen3-MoE model and a synthetic SFT data set under runs/, and
# fine-tunes it with LoRA in one process, printing step, loss and tokens/s.
# Extra arguments go to lathe_sft (see `build/runtime/lathe_sft --helpfull`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
mkdir -p runs
make_args=()
[ -f runs/tiny-qwen3-moe/config.json ] || make_args+=(--make_tiny_model runs/tiny-qwen3-moe)
[ -f runs/sft-data.jsonl ] || make_args+=(--make_data runs/sft-data.jsonl)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec build/runtime/lathe_sft "${make_args[@]}" \
  --model runs/tiny-qwen3-moe --data runs/sft-data.jsonl \
  --steps 30 --batch_size 8 --learning_rate 5e-3 --lora_rank 32 --min_loss_drop 0.05 "$@"
