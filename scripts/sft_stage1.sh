#!/usr/bin/env bash
# Stage 1 (warm-up) on 8 GPUs, Qwen2.5-VL-7B, paper settings (configs/sft_stage1.yaml, ZeRO-2).
source "$(dirname "$0")/sft_common.sh"
launch sft --config "$HERE/configs/sft_stage1.yaml" --set output_dir="$RUNS/stage1" "$@"
