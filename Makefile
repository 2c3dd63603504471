# gradtail: `make demo` runs the main job, `make test` runs the whole suite.
# Both set up .venv from a fresh clone with only python3 on the machine.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned (2.13.0, a CPU build on local disk) through the `torch` extra.
EXTRAS := torch,jax,optax,keras,lightning,transformers,flax,test,lint,bench,docs
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_WORKERS ?= 2

.PHONY: venv test lint typecheck unit docs demo bench docs-figures gpu-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-*
	touch $@

# ruff (lint and format) and mypy (typecheck).
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -q

# The documentation site (mkdocs.yml): a strict build (any warning fails) into site/.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

test: lint docs unit

# The main job: GradTail against uniform and inverse-frequency weighting on Fashion-MNIST-LT
# (installs Debian's dataset-fashion-mnist when run as root with apt-get; digits-LT otherwise).
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
demo: venv
	@if [ ! -e $(FASHION) ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "Installing Debian's dataset-fashion-mnist ..."; \
	  apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null || true; \
	fi
	$(BIN)/python -m benchmarks.longtail.demo

bench: venv
	$(BIN)/python benchmarks/core_ops.py
	$(BIN)/python benchmarks/render_tables.py

docs-figures: venv
	$(BIN)/python docs/make_curve_figure.py

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) build dist site *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
