# Two commands a user needs: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Exact versions for the venv and CI; pyproject.toml has lower bounds only.
CONSTRAINTS := .ci/constraints.txt

.PHONY: demo test install clean-venv gpu-check

# Packages go in with uv (the same packages from the same index as pip, unpacked in parallel: a
# fresh venv in 78 s against 136 s with pip on the 2-core VM, docs/DECISIONS.md), and with pip where
# uv cannot be installed or fails (e.g. an index that only pip's own config names). Bytecode is
# written for what the project imports (WARM_IMPORTS, then every run of `make test` or `make demo`
# adds what it imported), not for all of torch, transformers' hundreds of models and moto's AWS
# services: compiling everything was ~50 s of a fresh install.
comma := ,
define install
	$(VENV)/bin/uv pip install --quiet --python $(PY) $(1) || $(PY) -m pip install --quiet $(1)
endef
# A process writes the bytecode of what it imports, even where PYTHONDONTWRITEBYTECODE is set (as on
# the 2-core VM): otherwise every one of the suite's ~200 Python starts compiled torch again.
WRITE_BYTECODE := env -u PYTHONDONTWRITEBYTECODE
WARM_IMPORTS := import torch, torch._dynamo, torchvision, deepspeed, transformers, timm, pipeline.trainer

# torch first, then DeepSpeed from its sdist without build isolation so its build reuses that
# torch instead of downloading a second one.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	-$(PY) -m pip install --quiet -c $(CONSTRAINTS) uv
	$(call install,--upgrade setuptools wheel)
	$(call install,-c $(CONSTRAINTS) torch torchvision)
	$(call install,-c $(CONSTRAINTS) --no-build-isolation deepspeed)
	$(call install,-c $(CONSTRAINTS) -e '.[dev$(comma)demo]')
	$(WRITE_BYTECODE) $(PY) -c "$(WARM_IMPORTS)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(WRITE_BYTECODE) $(PY) launch/demo.py $(ARGS)

# Two pytest-xdist workers: a 2-rank run leaves a core idle while torchrun and the ranks import
# torch; files that share runs stay on one worker (tests/conftest.py). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
# Our own modules compiled first (the two workers would otherwise compile them side by side), and
# every process of the suite writes the bytecode of what it imports (WRITE_BYTECODE): where
# PYTHONDONTWRITEBYTECODE is set, each of its ~200 Python starts compiled them again (importing the
# trainer's modules: 4.7 s of CPU with them compiled, 5.1 s without; 3 runs each).
test: $(STAMP)
	$(PY) -m compileall -q -j 0 pipeline launch tests > /dev/null
	$(WRITE_BYTECODE) $(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --durations=30 tests

# The GPU machine check (not part of `make test`): with the Python that has the machine's own
# torch and this package installed (`pip install -e .`); `make gpu-check PYTHON=.venv/bin/python`
# uses the venv instead. Without CUDA it runs its tiny CPU form.
gpu-check:
	$(PYTHON) launch/gpu_check.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
