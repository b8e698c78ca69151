# Two commands do all set-up on a fresh machine with python3.11 + pip:
#   make demo   - create .venv if missing, install, run the end-to-end demo on embedded defaults
#   make demo-finetune - the demo, then its checkpoint fine-tuned on a second label set
#   make test   - create .venv if missing, install, run the whole test suite
#   make chaos  - the reliability suite: real faults injected into real runs (docs/reliability.md)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo demo-finetune test chaos bench bench-quick gpu-check install clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m launch.demo $(ARGS)

demo-finetune: $(STAMP)
	$(PY) -m launch.demo --finetune $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

chaos: $(STAMP)
	$(PY) -m reliability $(ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks $(ARGS)

gpu-check: $(STAMP)
	$(PY) -m benchmarks.gpu_check $(ARGS)

bench-quick: $(STAMP)
	$(PY) -m benchmarks --quick $(ARGS)

clean:
	rm -rf runs demo_out .pytest_cache
