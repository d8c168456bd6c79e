# qwentrt: `make engine && make serve`.  Override on the command line, e.g.
#   make engine PRESET=4b                          synthetic 4B checkpoint of the real shape
#   make engine MODEL=Qwen/Qwen3-4B-Instruct-2507  the real model from the Hugging Face Hub
#   make engine MODEL=/data/my-qwen3 ENGINE=build/mine BUILD_ARGS="--gpu-memory 20"
PYTHON ?= python3
VENV ?= .venv
PRESET ?= tiny
MODEL ?= build/checkpoints/qwen3-$(PRESET)
ENGINE ?= build/qwen3-$(PRESET)
BUILD_ARGS ?=
FORCE ?=

QWENTRT := $(VENV)/bin/qwentrt
SYNTH_MODEL := build/checkpoints/qwen3-$(PRESET)

.PHONY: install engine serve demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# Synthesize the checkpoint when MODEL is the default synthetic path, then build the engine.
engine: install
	@if [ "$(MODEL)" = "$(SYNTH_MODEL)" ] && [ ! -f "$(MODEL)/config.json" ]; then \
		echo "qwentrt synth $(MODEL) --preset $(PRESET)"; \
		$(QWENTRT) synth $(MODEL) --preset $(PRESET) || exit 1; fi
	@if [ -f "$(ENGINE)/engine.json" ] && [ -z "$(FORCE)" ]; then \
		echo "$(ENGINE) exists (make engine FORCE=1 to rebuild)"; $(QWENTRT) info $(ENGINE); \
	else \
		echo "qwentrt build $(MODEL) -o $(ENGINE) $(BUILD_ARGS)"; \
		$(QWENTRT) build $(MODEL) -o $(ENGINE) --force $(BUILD_ARGS); fi

serve demo bench: install
	@echo "make $@: not built yet (qwentrt serve, demo and bench arrive with the serving and speed issues)"; exit 2

test: install
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf build model_repository
