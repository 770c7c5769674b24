#!/usr/bin/env bash
# One GPU, one command, at most 8 minutes: bf16 ZeRO-2 and ZeRO-3 steps of `tiny` (TinyLlama-1.1B
# shapes with both encoders) with NCCL, and `debug-moe` with DeepSpeed AutoEP; prints ONE JSON
# object (tokens/s, MFU, peak GPU memory per case: benchmarks/gpu_steps.py) on stdout.
#
#   benchmarks/gpu.sh WHEELS_DIR [gpu_steps.py options]   # a bare GPU machine: Python + a CUDA torch
#   benchmarks/gpu.sh --cpu-smoke                          # here: the same code path on CPU / gloo
#   benchmarks/gpu.sh --make-wheels WHEELS_DIR             # here: fill WHEELS_DIR for the GPU machine
#   benchmarks/gpu.sh --eval RELEASE_DIR BENCH_FILE [OUT]  # after an install: convert + score a benchmark file
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

if [[ "${1:-}" == "--eval" ]]; then
    # After an install (the venv above, with the CUDA `vllm` beside the CUDA torch): convert a
    # published release and score a benchmark file the user provides on one GPU engine; prints the
    # eval stage's summary table and leaves OUT/eval/<name>/scores.json.
    #   benchmarks/gpu.sh --eval RELEASE_DIR BENCH.tsv|.jsonl [OUT]
    #   env: SX_EVAL_FORMAT (vlmevalkit_tsv | vqa_tsv | jsonl), SX_EVAL_METRIC, SX_EVAL_CIRCULAR=1
    release="${2:?usage: gpu.sh --eval RELEASE_DIR BENCH_FILE [OUT]}"
    bench="$(realpath "${3:?usage: gpu.sh --eval RELEASE_DIR BENCH_FILE [OUT]}")"
    out="$(realpath -m "${4:-/tmp/sx-gpu-eval}")"
    VENV="${SX_GPU_VENV:-/tmp/sx-gpu-venv}"
    PY="$VENV/bin/python"; [[ -x "$PY" ]] || PY="$PYTHON"
    mkdir -p "$out"
    cd "$ROOT"
    export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
    [[ -f "$out/model/config.json" ]] || timeout 900 "$PY" -m pipelines.cli convert --from accessory "$release" \
        -o "$out/model" --dtype bfloat16 --json
    fmt="${SX_EVAL_FORMAT:-}"
    [[ -n "$fmt" ]] || { [[ "$bench" == *.jsonl ]] && fmt=jsonl || fmt=vlmevalkit_tsv; }
    circular=false; [[ -n "${SX_EVAL_CIRCULAR:-}" ]] && circular=true
    metric=""; [[ -n "${SX_EVAL_METRIC:-}" ]] && metric=", metric: $SX_EVAL_METRIC"
    cat > "$out/eval-spec.yaml" <<YAML
name: gpu-eval
cluster: {head: {cpus: 8, gpus: 1}}
storage: {uri: $out, endpoint_url: null}
eval:
  model: $out/model
  num_gpus_per_actor: 1
  benchmarks:
    - {name: $(basename "${bench%.*}"), path: $bench, format: $fmt, circular: $circular$metric}
YAML
    exec timeout 1800 "$PY" -m pipelines.cli eval "$out/eval-spec.yaml"
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
