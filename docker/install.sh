#!/usr/bin/env bash
# The image's Python environment, step by step. The Dockerfile runs it; tests/docker/test_install.py
# runs it in a fresh virtualenv (SPHINX_X_VLLM=check), so a broken line fails CI.
#
#   bash docker/install.sh                      # from anywhere; installs into `python` on PATH
#   PYTHON=/path/to/python bash docker/install.sh
#   SPHINX_X_VLLM=check bash docker/install.sh  # vLLM only resolved, not installed (CPU machines)
#   SPHINX_X_VLLM=skip  bash docker/install.sh  # no vLLM at all
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(command -v "${PYTHON:-python}")"
VLLM="${SPHINX_X_VLLM:-install}"
# one download cache for the whole script (the vLLM plan and its install share it), gone at the end
if [ -z "${PIP_CACHE_DIR:-}" ]; then
  PIP_CACHE_DIR="$(mktemp -d)"; export PIP_CACHE_DIR; trap 'rm -rf "$PIP_CACHE_DIR"' EXIT
fi
pip() { "$PY" -m pip install "$@"; }
step() { echo "[install.sh $(date +%T)] $*"; }

step "1/5 torch"
# 1. torch first, and pinned: an unpinned or late torch lets a dependency choose it. On PyPI
#    (Linux x86_64) torch==2.13.0 is the CUDA build the GPU nodes need; where a local CPU wheel
#    2.13.0+cpu is offered (a find-links directory, as on the CI machines) pip takes that one.
pip "$(grep -E '^torch==' cluster/requirements.txt)"

step "2/5 cluster/requirements.txt"
# 2. every pin of the node environment (the same file Ray Jobs ship to a stock cluster).
pip -r cluster/requirements.txt

step "3/5 sphinx-x"
# 3. the project itself; its dependencies are the pins above, nothing else may come in.
pip --no-deps .

step "4/5 vLLM ($VLLM)"
# 4. vLLM for GPU serving (docker/vllm.txt says why this version). Installing it must not move
#    a pin: the plan is checked first, whatever the mode.
plan="$PIP_CACHE_DIR/vllm-plan.json"
case "$VLLM" in
  install|check)
    "$PY" -m pip install --dry-run --quiet --report "$plan" -r docker/vllm.txt
    "$PY" docker/check_env.py --plan "$plan"
    if [ "$VLLM" = install ]; then pip -r docker/vllm.txt; fi ;;
  skip) ;;
  *) echo "SPHINX_X_VLLM must be install, check or skip, got '$VLLM'" >&2; exit 2 ;;
esac

step "5/5 check"
# 5. every pin holds and sphinx-x's (and vLLM's) requirements are met; the project imports.
"$PY" docker/check_env.py
# (from an empty directory, so the installed copy is imported, not this source tree)
(cd "$(mktemp -d)" && "$PY" -c "import actors, cluster, models, pipelines.cli, deepspeed, transformers, \
ray.train, ray.serve; import cluster.spec as s; print('sphinx-x', s.PROJECT_VERSION, 'imports from', cluster.__file__)")
step "done"
