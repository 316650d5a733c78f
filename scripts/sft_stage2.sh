#!/usr/bin/env bash
# Stage 2 on 8 GPUs from the stage-1 weights with the stage-1 teacher reps (configs/sft_stage2.yaml).
# Extra arguments go to `monet sft`; --dry-run prints the command.
source "$(dirname "$0")/sft_common.sh"
MODEL="$(latest "$RUNS/stage1")"
launch sft --config "$HERE/configs/sft_stage2.yaml" --set model="$MODEL" \
  --set teacher_store="$RUNS/teacher_reps" --set output_dir="$RUNS/stage2" "$@"
