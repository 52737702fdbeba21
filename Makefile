PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test docs release-check demo bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,models,plot]"
	touch $(STAMP)

test: venv
	$(PY) -m ruff check gradbalance reference_models benchmarks tests examples tools
	$(PY) -m mypy
	$(PY) -m pytest -n 2 --doctest-modules gradbalance tests
	GB_BENCH_ROUNDS=1 $(PY) -m pytest benchmarks --benchmark-disable -q
	$(MAKE) docs release-check

# The documentation site, warnings as errors; output in site/.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

# sdist + wheel, twine check, and the Quickstart in a fresh venv holding only the wheel and torch.
release-check: venv
	$(PY) tools/release_check.py

demo: venv
	$(PY) -m reference_models.demo

bench: venv
	mkdir -p benchmarks/results
	$(PY) -m pytest benchmarks -s --benchmark-json=benchmarks/results/pytest_benchmark.json
	$(PY) -m benchmarks.summarize

clean:
	rm -rf $(VENV) .pytest_cache site dist
