#!/usr/bin/env bash
# Teacher latents: the frozen stage-2 model on the stage-2 layout, all-layer hidden states at the
# latent positions, bf16, into $RUNS/teacher_latents (resumable, self-repairing like teacher reps).
# Extra arguments go to `monet precompute`; --dry-run prints the command.
source "$(dirname "$0")/sft_common.sh"
MODEL="$(latest "$RUNS/stage2")"
NPROC=1 launch precompute teacher-latents --config "$HERE/configs/sft_stage2.yaml" \
  --set model="$MODEL" --out "$RUNS/teacher_latents" --dtype bfloat16 "$@"
