#!/usr/bin/env bash
# Stage 3 on 8 GPUs: starts again from the STAGE-1 weights, no helper images, latent distillation
# against the stage-2 teacher latents (configs/sft_stage3.yaml).
# Extra arguments go to `monet sft`; --dry-run prints the command.
source "$(dirname "$0")/sft_common.sh"
MODEL="$(latest "$RUNS/stage1")"
launch sft --config "$HERE/configs/sft_stage3.yaml" --set model="$MODEL" \
  --set teacher_store="$RUNS/teacher_latents" --set output_dir="$RUNS/stage3" "$@"
