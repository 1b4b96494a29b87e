# Entry points: `make quickstart`, `make test`, `make test-gpu`. Each creates (or reuses) $(VENV) from requirements.txt
# (this repository, editable, with every extra of pyproject.toml),
# pinned to the tested versions in constraints/py<major.minor>.txt when that file exists for $(PYTHON)'s version.
# `make test CONSTRAINTS=` installs the newest releases requirements.txt allows instead; `make test PYTHON=python3.12
# VENV=.venv-py3.12` uses another Python.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYVER := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
CONSTRAINTS ?= $(wildcard constraints/py$(PYVER).txt)

.PHONY: quickstart test test-gpu lint constraints

$(VENV)/.installed: requirements.txt pyproject.toml $(CONSTRAINTS)
	@test -n "$(PYVER)" || { echo "error: PYTHON=$(PYTHON) does not run"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade --quiet pip
	$(VENV)/bin/pip install --quiet -r requirements.txt $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	touch $@

quickstart: $(VENV)/.installed
	$(PY) scripts/quickstart.py

# pytest exits 5 when it collects no test: a failure (a suite that ran nothing must not pass), said in one line.
test: $(VENV)/.installed
	$(PY) -m pytest -q tests; status=$$?; \
	if [ $$status -eq 5 ]; then echo "error: pytest collected no tests from tests/" >&2; fi; exit $$status

# Only the CUDA tests (tests/test_gpu.py and any test marked gpu); without a visible GPU they are reported as skipped.
test-gpu: $(VENV)/.installed
	$(PY) -m pytest -q -m gpu -rA tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# Record $(VENV)'s versions as the tested set for its Python (run after `make test CONSTRAINTS=` has passed).
constraints: $(VENV)/.installed
	@mkdir -p constraints
	{ echo "# Tested set for Python $(PYVER): what \`make test CONSTRAINTS=\` installed on $$(date -u +%Y-%m-%d) when the suite passed."; \
	  echo "# make test installs with these pins; make test CONSTRAINTS= takes the newest releases requirements.txt allows."; \
	  $(VENV)/bin/pip freeze --exclude-editable; } > constraints/py$(PYVER).txt
