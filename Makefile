# One command for the tests, one for the demo; each sets up what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.acm_d2-installed
PYTEST_ARGS ?=

.PHONY: test test-all demo demo-compare venv clean

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

demo: $(STAMP)
	$(PY) tools/demo.py --output output/demo

demo-compare: $(STAMP)
	$(PY) tools/demo.py --output output/demo-compare --compare

clean:
	rm -rf $(VENV) output
