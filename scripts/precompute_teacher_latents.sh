#!/usr/bin/env bash
# Teacher latents: the frozen stage-2 model on the stage-2 layout, all-layer hidden states at the
# latent positions, bf16, into $RUNS/teacher_latents (resumable).
source "$(dirname "$0")/sft_common.sh"
NPROC=1 launch precompute teacher-latents --config "$HERE/configs/sft_stage2.yaml" \
  --set model="$(latest "$RUNS/stage2")" --out "$RUNS/teacher_latents" --dtype bfloat16 "$@"
