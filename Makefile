PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS := dev,models,plot,log
# make test-latest: a throw-away venv with today's releases of every extra (no lock).
LATEST_VENV := .venv-latest

.PHONY: venv lock check-lock test test-latest docs release-check demo bench lint clean

venv: $(STAMP)

# The venv holds exactly constraints.txt, the complete lock that `make lock` generates.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	$(PY) tools/check_lock.py constraints.txt
	touch $(STAMP)

# Re-resolve pyproject.toml's extras and the hand pins of constraints.in into constraints.txt
# (every platform, Python >= 3.10), then rebuild the venv from it.
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	test -x $(VENV)/bin/uv || $(PY) -m pip install --quiet uv
	$(PY) -m uv pip compile pyproject.toml constraints.in --all-extras --universal \
		--python-version 3.10 --quiet --output-file constraints.txt
	$(MAKE) venv

check-lock: venv
	$(PY) tools/check_lock.py constraints.txt

test: check-lock
	$(PY) -m ruff check gradbalance reference_models benchmarks tests examples tools
	$(PY) -m mypy
	$(PY) -m pytest -n 2 --durations=15 --doctest-modules gradbalance tests
	GB_BENCH_ROUNDS=1 $(PY) -m pytest benchmarks --benchmark-disable -q
	$(MAKE) docs release-check

# The documentation site, warnings as errors; output in site/.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

# sdist + wheel, twine check, and the Quickstart in a fresh venv holding only the wheel and torch.
release-check: venv
	$(PY) tools/release_check.py

# What a new user installs today: latest releases, no lock; the library and reference-model tests.
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install --quiet -e ".[$(EXTRAS)]"
	$(LATEST_VENV)/bin/python -m pip list --format=freeze > $(LATEST_VENV)/versions.txt
	$(LATEST_VENV)/bin/python -m pytest -n 2 --durations=15 --doctest-modules gradbalance \
		tests/gradbalance tests/reference_models

demo: venv
	$(PY) -m reference_models.demo

bench: venv
	mkdir -p benchmarks/results
	$(PY) -m pytest benchmarks -s --benchmark-json=benchmarks/results/pytest_benchmark.json
	$(PY) -m benchmarks.summarize

clean:
	rm -rf $(VENV) $(LATEST_VENV) .pytest_cache site dist
