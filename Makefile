# The two commands a newcomer needs: `make demo` and `make test` (each sets up first).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sgl-esamp-installed

.PHONY: setup test demo
setup: $(STAMP)

$(STAMP): pyproject.toml tests/support/pyproject.toml scripts/setup.sh $(wildcard scripts/cpu_sgl_kernel/*.toml scripts/cpu_sgl_kernel/sgl_kernel/*.py)
	VENV=$(VENV) bash scripts/setup.sh
	touch $@

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) examples/fork_explore.py
