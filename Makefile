# One command for the tests, one for the demo; each sets up what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.acm_d2-installed
PYTEST_ARGS ?=

.PHONY: test test-all lint demo demo-compare venv wheelhouse clean

# The stamp is written last, so an interrupted install counts as incomplete and is redone.
$(STAMP): setup.py scripts/install_detectron2.sh Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip<27" "setuptools<81" wheel
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	bash scripts/install_detectron2.sh $(PY)
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS) tests

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# ruff.toml: pycodestyle, pyflakes and import order, formatted at Detectron2's line length (100).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: $(STAMP)
	$(PY) tools/demo.py --output output/demo

demo-compare: $(STAMP)
	$(PY) tools/demo.py --output output/demo-compare --compare

# Offline install (docs/install.md): the wheels of acm_d2, detectron2 and their dependencies
# for CPython $(PYTHON_VERSION) (default: $(PY)'s) on manylinux x86_64, minus WHEELHOUSE_EXCLUDE, which the
# target environment must already have. torchvision requires numpy and Pillow, so every torch
# environment has those too.
PYTHON_VERSION ?=
WHEELHOUSE ?= wheelhouse
WHEELHOUSE_EXCLUDE ?= torch torchvision numpy pillow

# Building wheels needs pip, wheel and packaging, not torch: a bare venv will do (`make venv` completes it).
$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip<27" "setuptools<81" wheel packaging

wheelhouse: $(PY)
	$(PY) scripts/build_wheelhouse.py $(if $(PYTHON_VERSION),--python-version $(PYTHON_VERSION)) \
		--output $(WHEELHOUSE) --exclude $(WHEELHOUSE_EXCLUDE)

clean:
	rm -rf $(VENV) output
