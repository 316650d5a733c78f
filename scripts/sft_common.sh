# Shared by the launch scripts (sft_stage{1,2,3}.sh, precompute_teacher_{reps,latents}.sh); sourced,
# never run. Provides:
#   HERE    this scripts/ folder (configs live in $HERE/configs)
#   ROOT    the repository root (commands run from here)
#   RUNS    where stages write: $RUNS/stage1, $RUNS/teacher_reps, ... (default $ROOT/runs)
#   latest DIR   the checkpoint DIR/latest names (an error if the previous stage has not finished)
#   launch ARGS  run `monet ARGS` under torchrun on NPROC processes (python directly when NPROC=1)
#
# Settings (the scripts' interface): NPROC (default 8), PYTHON (default python3), RUNS, and
# dry-run mode: DRY_RUN=1 or a --dry-run argument prints the command instead of running it (a
# missing previous-stage checkpoint is then shown as DIR/checkpoint-LATEST, with a note on stderr).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
RUNS="${RUNS:-$ROOT/runs}"
NPROC="${NPROC:-8}"
PYTHON="${PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-0}"
for _arg in "$@"; do
  [[ "$_arg" == "--dry-run" ]] && DRY_RUN=1
done
unset _arg

latest() {
  local dir="$1"
  if [[ -f "$dir/latest" ]]; then
    local name
    name="$(tr -d '[:space:]' < "$dir/latest")"
    if [[ -n "$name" && -d "$dir/$name" ]]; then
      echo "$dir/$name"
      return 0
    fi
  fi
  if [[ "$DRY_RUN" == "1" ]]; then
    echo "note: $dir has no finished checkpoint yet (dry run continues)" >&2
    echo "$dir/checkpoint-LATEST"
    return 0
  fi
  echo "error: no finished checkpoint in $dir ($dir/latest missing or dangling); run the previous stage first" >&2
  return 1
}

launch() {
  local args=() a
  for a in "$@"; do
    [[ "$a" == "--dry-run" ]] || args+=("$a")
  done
  local cmd
  if [[ "$NPROC" -gt 1 ]]; then
    cmd=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m monet.cli "${args[@]}")
  else
    cmd=("$PYTHON" -m monet.cli "${args[@]}")
  fi
  if [[ "$DRY_RUN" == "1" ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    return 0
  fi
  cd "$ROOT"
  exec "${cmd[@]}"
}
