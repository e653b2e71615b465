# Two entry points for a fresh machine (see README): `make quickstart` and `make test`.
# Both build .venv first when it is missing or older than the pinned requirements.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv quickstart test clean-venv

venv: $(STAMP)

# torch first and alone: pip takes the local CPU wheel for an exact pin, whereas a later
# package asking for "torch" could pull a multi-GB CUDA build (REFERENCES.md §1).
$(STAMP): pyproject.toml requirements/dev.txt requirements/megatron.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements/dev.txt
	$(PY) -m pip install --quiet --ignore-requires-python -r requirements/megatron.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# the quickstart recipe: default plan vs AdamW, report + plot under runs/quickstart/
quickstart: $(STAMP)
	$(VENV)/bin/archopt run recipes/quickstart.yaml

# pytest exits 5 when it collects no tests; that is a failure here, like any non-zero code.
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; fi; exit $$rc

clean-venv:
	rm -rf $(VENV)
