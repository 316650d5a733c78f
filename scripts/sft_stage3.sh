#!/usr/bin/env bash
# Stage 3 on 8 GPUs: starts again from the STAGE-1 weights, no helper images, latent distillation
# against the stage-2 teacher latents (configs/sft_stage3.yaml).
source "$(dirname "$0")/sft_common.sh"
launch sft --config "$HERE/configs/sft_stage3.yaml" --set model="$(latest "$RUNS/stage1")" \
  --set teacher_store="$RUNS/teacher_latents" --set output_dir="$RUNS/stage3" "$@"
