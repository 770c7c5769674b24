#!/usr/bin/env bash
# One GPU, one command, at most 8 minutes: bf16 ZeRO-2 and ZeRO-3 steps of `tiny` (TinyLlama-1.1B
# shapes with both encoders) with NCCL, and `debug-moe` with DeepSpeed AutoEP; prints ONE JSON
# object (tokens/s, MFU, peak GPU memory per case: benchmarks/gpu_steps.py) on stdout.
#
#   benchmarks/gpu.sh WHEELS_DIR [gpu_steps.py options]   # a bare GPU machine: Python + a CUDA torch
#   benchmarks/gpu.sh --cpu-smoke                          # here: the same code path on CPU / gloo
#   benchmarks/gpu.sh --make-wheels WHEELS_DIR             # here: fill WHEELS_DIR for the GPU machine
#
# WHEELS_DIR holds sphinx-x and its dependency closure EXCEPT torch (the machine's CUDA torch is
# kept: a virtual environment with --system-site-packages, every wheel installed --no-deps, no
# index). --make-wheels builds it from this checkout's .venv (pip freeze minus torch/nvidia/triton).
# Copy this checkout's benchmarks/ directory along (the script runs benchmarks/gpu_steps.py).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PYTHON="${PYTHON:-python3}"
LOG="${SX_GPU_LOG:-/tmp/sx-gpu-install.log}"

if [[ "${1:-}" == "--cpu-smoke" ]]; then
    shift
    PY="${ROOT}/.venv/bin/python"
    [[ -x "$PY" ]] || PY="$PYTHON"
    exec timeout 470 "$PY" "$HERE/gpu_steps.py" --cpu-smoke "$@"
fi

if [[ "${1:-}" == "--make-wheels" ]]; then
    out="${2:?usage: gpu.sh --make-wheels WHEELS_DIR}"
    mkdir -p "$out"
    "$ROOT/.venv/bin/python" -m pip wheel --no-deps -w "$out" "$ROOT" >&2
    "$ROOT/.venv/bin/python" -m pip freeze --exclude-editable \
        | grep -v -i -E '^(torch|torchvision|torchaudio|triton|nvidia-|sphinx-x|-e )' > "$out/requirements.txt"
    "$ROOT/.venv/bin/python" -m pip download --no-deps -d "$out" -r "$out/requirements.txt" >&2
    echo "{\"wheels\": \"$out\", \"files\": $(ls "$out" | wc -l)}"
    exit 0
fi

WHEELS="${1:?usage: gpu.sh WHEELS_DIR [options] | --cpu-smoke | --make-wheels DIR}"
shift
[[ -d "$WHEELS" ]] || { echo "no wheel directory $WHEELS" >&2; exit 2; }
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)" \
    || { echo "this needs a CUDA torch and a visible GPU (try --cpu-smoke)" >&2; exit 3; }

VENV="${SX_GPU_VENV:-/tmp/sx-gpu-venv}"
{
    "$PYTHON" -m venv --system-site-packages "$VENV"
    # every wheel as given, none resolved from an index; the system CUDA torch stays
    timeout 240 "$VENV/bin/pip" install --no-index --no-deps --find-links "$WHEELS" "$WHEELS"/*.whl
    "$VENV/bin/pip" check || true
} > "$LOG" 2>&1 || { echo "install failed; see $LOG" >&2; tail -20 "$LOG" >&2; exit 4; }

cd "$ROOT"
export NCCL_P2P_DISABLE="${NCCL_P2P_DISABLE:-0}" HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
# the rest of the 8 minutes: three cases, each building its model on the GPU
exec timeout 220 "$VENV/bin/python" "$HERE/gpu_steps.py" "$@"
