#!/usr/bin/env bash
# Stage 1 (warm-up) on 8 GPUs, Qwen2.5-VL-7B, paper settings (configs/sft_stage1.yaml, ZeRO-2).
# Extra arguments go to `monet sft` (e.g. --resume, --set max_steps=10); --dry-run prints the command.
source "$(dirname "$0")/sft_common.sh"
launch sft --config "$HERE/configs/sft_stage1.yaml" --set output_dir="$RUNS/stage1" "$@"
