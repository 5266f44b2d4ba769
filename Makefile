# Every target creates .venv and installs requirements.txt first when they are missing or changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL ?= 2

DATA_DIR ?=
CONFIG ?= configs/default.yaml
RUN ?=
ARGS ?=
INPUT ?=
OUT ?= diagnosis
# A value with a space (OUT="my results") is passed to the shell in double quotes.
quoted = $(if $(word 2,$(1)),"$(1)",$(1))
DATA_FLAG := $(if $(DATA_DIR),--data-dir $(call quoted,$(DATA_DIR)),)

.PHONY: venv test lint index weights viewer train evaluate diagnose bench release clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Two workers, one test file each at a time (module fixtures such as the Ray cluster stay in one
# process): most tests wait on a subprocess's imports or on one TensorFlow thread. On 2 cores the
# suite took 382 s this way against 611 s serially (fresh clones, quiet machine). TEST_WORKERS=0
# runs it serially.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile) $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline tests

index: $(STAMP)
	$(PY) -m pipeline index $(DATA_FLAG) $(ARGS)

weights: $(STAMP)
	$(PY) -m pipeline weights $(ARGS)

# NiiVue for the review page's 3D views (npm @niivue/niivue@0.69.0, checksums pinned): third_party/niivue/
viewer: $(STAMP)
	$(PY) -m pipeline viewer --if-missing $(ARGS)

train: $(STAMP)
	$(PY) -m pipeline weights --if-missing
	$(PY) -m pipeline train --config $(CONFIG) $(DATA_FLAG) $(ARGS)

evaluate: $(STAMP)
	$(PY) -m pipeline evaluate $(DATA_FLAG) $(if $(RUN),--run $(call quoted,$(RUN)),) $(ARGS)

# INPUT is a list (files, folders, globs expanded by the program), so it stays unquoted; OUT is one folder.
diagnose: $(STAMP)
	@test -n "$(INPUT)" || (echo "usage: make diagnose INPUT=<files|folders|globs> OUT=<folder>" >&2; exit 2)
	$(PY) -m pipeline diagnose $(INPUT) --out $(call quoted,$(OUT)) $(ARGS)

release: $(STAMP)
	$(PY) -m pipeline release $(if $(RUN),--run $(call quoted,$(RUN)),) $(ARGS)

bench: $(STAMP)
	$(PY) -m pipeline bench $(ARGS)

clean:
	rm -rf .pytest_cache .ruff_cache
