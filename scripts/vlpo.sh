#!/usr/bin/env bash
# VLPO on 8 GPUs with the paper's settings (scripts/configs/vlpo.yaml): n 8 rollouts per prompt,
# 64 prompts per rollout round, lr 1e-6, sigma 10, K 10, temperature 0.5, top-p 0.99,
# 4096 prompt / 4096 response tokens, KL 0.01, select_acc_threshold 0.6; 4 one-GPU rollout engines
# (rollout_engines) and 4 training ranks (train_workers), so it needs the Ray controller.
#
# Usage: scripts/vlpo.sh [--dry-run] [extra `monet vlpo` arguments, e.g. --resume, --set key=value]
# Settings: PYTHON (default python3), RUNS (default <repo>/runs), POLICY (default: the checkpoint
# $RUNS/stage3/latest names), DATA (default <repo>/data/Thyme-RL/train.parquet), CONTROLLER
# (local or ray; default ray), RAY_ADDRESS (join an existing cluster, see docs/vlpo.md).
# DRY_RUN=1 or --dry-run prints the command instead of running it.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
RUNS="${RUNS:-$ROOT/runs}"
PYTHON="${PYTHON:-python3}"
DATA="${DATA:-$ROOT/data/Thyme-RL/train.parquet}"
CONTROLLER="${CONTROLLER:-ray}"
DRY_RUN="${DRY_RUN:-0}"
args=()
for a in "$@"; do
  if [[ "$a" == "--dry-run" ]]; then DRY_RUN=1; else args+=("$a"); fi
done

if [[ -z "${POLICY:-}" ]]; then
  if [[ -f "$RUNS/stage3/latest" ]]; then
    POLICY="$RUNS/stage3/$(tr -d '[:space:]' < "$RUNS/stage3/latest")"
  elif [[ "$DRY_RUN" == "1" ]]; then
    echo "note: $RUNS/stage3 has no finished checkpoint yet (dry run continues)" >&2
    POLICY="$RUNS/stage3/checkpoint-LATEST"
  else
    echo "error: no finished SFT stage-3 checkpoint in $RUNS/stage3 (set POLICY=DIR)" >&2
    exit 1
  fi
fi

# LatentLLM needs vLLM's V1 model runner on GPU (vLLM 0.32 defaults to V2 there)
export VLLM_USE_V2_MODEL_RUNNER="${VLLM_USE_V2_MODEL_RUNNER:-0}"
cmd=("$PYTHON" -m monet.cli vlpo --config "$HERE/configs/vlpo.yaml" --controller "$CONTROLLER"
     --set "model=$POLICY" --set "data=[$DATA]" --set "output_dir=$RUNS/vlpo")
[[ -n "${RAY_ADDRESS:-}" ]] && cmd+=(--ray-address "$RAY_ADDRESS")
cmd+=(${args[@]+"${args[@]}"})
if [[ "$DRY_RUN" == "1" ]]; then
  printf '%q ' "${cmd[@]}"
  printf '\n'
  exit 0
fi
cd "$ROOT"
exec "${cmd[@]}"
