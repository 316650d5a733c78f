#!/usr/bin/env bash
# Stage 2 on 8 GPUs from the stage-1 weights with the stage-1 teacher reps (configs/sft_stage2.yaml).
source "$(dirname "$0")/sft_common.sh"
launch sft --config "$HERE/configs/sft_stage2.yaml" --set model="$(latest "$RUNS/stage1")" \
  --set teacher_store="$RUNS/teacher_reps" --set output_dir="$RUNS/stage2" "$@"
