#!/usr/bin/env bash
# Teacher representations: the frozen stage-1 model on the stage-1 layout, all-layer hidden states
# (embeddings + 28 layers for the 7B = 29) at observation positions, bf16, into $RUNS/teacher_reps.
# Resumable: rerun after an interruption and finished samples are skipped (and entries of a shard
# that fails its checksum are recomputed). Extra arguments go to `monet precompute`; --dry-run prints.
source "$(dirname "$0")/sft_common.sh"
MODEL="$(latest "$RUNS/stage1")"
NPROC=1 launch precompute teacher-reps --config "$HERE/configs/sft_stage1.yaml" \
  --set model="$MODEL" --out "$RUNS/teacher_reps" --dtype bfloat16 "$@"
