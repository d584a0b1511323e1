# One command for the tests, one for the demo; each sets up what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.acm_d2-installed
PYTEST_ARGS ?=

.PHONY: test test-all lint demo demo-compare venv lock wheelhouse weights clean

# Every version `make venv` installs comes from CONSTRAINTS (written by `make lock`), so each clone
# tests the same packages; `make venv CONSTRAINTS=` takes the newest within setup.py's ranges instead.
LOCK_FILE := constraints.txt
CONSTRAINTS ?= $(LOCK_FILE)
PIN := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
BOOTSTRAP := "pip<27" "setuptools<81" wheel
TORCH := torch==2.14.1 torchvision==0.29.1

# The stamp is written last, so an interrupted install counts as incomplete and is redone.
$(STAMP): setup.py scripts/install_detectron2.sh Makefile $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade $(PIN) $(BOOTSTRAP)
	$(PY) -m pip install -q $(PIN) $(TORCH)
	$(PY) -m pip install -q $(PIN) -e ".[test]"
	bash scripts/install_detectron2.sh $(PY)
	touch $(STAMP)

venv: $(STAMP)

# Refreshes LOCK_FILE on purpose: installs what `make venv` installs, newest within setup.py's
# ranges, into a scratch venv and writes its exact versions (acm_d2 itself left out). Then `make test`.
lock:
	d=$$(mktemp -d) && trap 'rm -rf "$$d"' EXIT && python3 -m venv "$$d/v" && \
	"$$d/v/bin/pip" install -q --upgrade $(BOOTSTRAP) && \
	"$$d/v/bin/pip" install -q $(TORCH) && \
	"$$d/v/bin/pip" install -q -e ".[test]" && \
	{ sed -n '/^#/p' $(LOCK_FILE); \
	  "$$d/v/bin/pip" freeze --all --exclude-editable | grep -v -e '^#' -e '^-e' | LC_ALL=C sort -f; \
	} > "$$d/lock" && cp "$$d/lock" $(LOCK_FILE)
	@echo "wrote $(LOCK_FILE): review the changes (git diff $(LOCK_FILE)), then make test"

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

# Offline install (docs/install.md): the wheels of acm_d2 (with WHEELHOUSE_EXTRAS, e.g. deploy),
# detectron2 and their dependencies for CPython $(PYTHON_VERSION) (default: $(PY)'s) on manylinux
# x86_64, minus WHEELHOUSE_EXCLUDE, which the target environment must already have. torchvision
# requires numpy and Pillow, so every torch environment has those too.
PYTHON_VERSION ?=
WHEELHOUSE ?= wheelhouse
WHEELHOUSE_EXCLUDE ?= torch torchvision numpy pillow
WHEELHOUSE_EXTRAS ?=

# Building wheels needs pip, wheel and packaging, not torch: a bare venv will do (`make venv` completes it).
$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade $(PIN) $(BOOTSTRAP) packaging

wheelhouse: $(PY)
	$(PY) scripts/build_wheelhouse.py $(if $(PYTHON_VERSION),--python-version $(PYTHON_VERSION)) \
		--output $(WHEELHOUSE) --exclude $(WHEELHOUSE_EXCLUDE) \
		$(if $(WHEELHOUSE_EXTRAS),--extras $(WHEELHOUSE_EXTRAS))

# The weights the configs fetch at start (detectron2://ImageNetPretrained/...), fetched ahead into
# WEIGHTS_CACHE for a cluster without internet: there, run with FVCORE_CACHE=<that folder>.
WEIGHTS_CACHE ?= weights-cache
weights: $(STAMP)
	$(PY) tools/fetch_weights.py --cache $(WEIGHTS_CACHE)

clean:
	rm -rf $(VENV) output
