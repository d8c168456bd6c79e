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
BENCH_ARGS ?=
FORCE ?=
HOST ?= 127.0.0.1
GRPC_PORT ?= 8001
HTTP_PORT ?= 8000
METRICS_PORT ?= 8002

QWENTRT := $(VENV)/bin/qwentrt
SYNTH_MODEL := build/checkpoints/qwen3-$(PRESET)

.PHONY: install engine serve demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[server,test]'
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

# Serve ENGINE with tritonserver (gRPC $(GRPC_PORT), HTTP $(HTTP_PORT), metrics $(METRICS_PORT)) until Ctrl-C.
serve: install
	@[ -f "$(ENGINE)/engine.json" ] || { echo "no engine at $(ENGINE): run make engine first"; exit 2; }
	$(QWENTRT) serve $(ENGINE) --repo model_repository --host $(HOST) --grpc-port $(GRPC_PORT) \
		--http-port $(HTTP_PORT) --metrics-port $(METRICS_PORT)

# Any machine: tiny synthetic checkpoint -> engine -> tritonserver on free ports -> one streamed request.
demo: install
	$(MAKE) --no-print-directory engine PRESET=tiny MODEL=build/checkpoints/qwen3-tiny ENGINE=build/qwen3-tiny
	$(VENV)/bin/python -m qwentrt.serving.demo build/qwen3-tiny

# Measure ENGINE (engine-direct and served): make bench ENGINE=build/qwen3-4b BENCH_ARGS="--peer hf --quick"
# Writes build/bench/<engine>-<time>/ (results.json, report.md, PNGs); see docs/PERFORMANCE.md.
bench: install
	@[ -f "$(ENGINE)/engine.json" ] || { echo "no engine at $(ENGINE): run make engine first"; exit 2; }
	$(QWENTRT) bench $(ENGINE) $(BENCH_ARGS)

test: install
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf build model_repository

# Soak (not part of make test): a mixed load on ENGINE for SOAK_MINUTES at SOAK_CONCURRENCY; JSON report
# under build/soak/ (errors by code, TTFT p99 drift, server RSS and GPU memory growth). See docs/RELIABILITY.md.
SOAK_MINUTES ?= 10
SOAK_CONCURRENCY ?= 64
SOAK_ARGS ?=
.PHONY: soak
soak: install
	@[ -f "$(ENGINE)/engine.json" ] || { echo "no engine at $(ENGINE): run make engine first"; exit 2; }
	$(QWENTRT) soak $(ENGINE) --minutes $(SOAK_MINUTES) --concurrency $(SOAK_CONCURRENCY) $(SOAK_ARGS)
