#!/usr/bin/env bash
# Teacher representations: the frozen stage-1 model on the stage-1 layout, all-layer hidden states
# (embeddings + 28 layers for the 7B = 29) at observation positions, bf16, into $RUNS/teacher_reps.
# Resumable: rerun after an interruption and finished samples are skipped.
source "$(dirname "$0")/sft_common.sh"
NPROC=1 launch precompute teacher-reps --config "$HERE/configs/sft_stage1.yaml" \
  --set model="$(latest "$RUNS/stage1")" --out "$RUNS/teacher_reps" --dtype bfloat16 "$@"
