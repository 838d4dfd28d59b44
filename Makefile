# Two commands on a fresh machine: `make serve` and `make test`.
# The venv is created on first use; torch is pinned to the CPU wheel first so that no
# resolver ever pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv serve test data model bench clean wheels image

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

serve: venv
	ANYTIME_HOST=$(HOST) ANYTIME_PORT=$(PORT) $(PY) -m service

test: venv
	$(PY) -m pytest -q

# Offline photos for training, tables and benchmarks (Debian packages; needs root).
data:
	apt-get install -y mate-backgrounds plasma-workspace-wallpapers

# Rebuild the bundled ARM-FSRCNN from scratch (about an hour on 2 cores; needs `make data`).
ARM_ITERS ?= 55000
ARM_RUN ?= runs/arm-fsrcnn
model: venv
	$(PY) -m models.arm.train --backbone fsrcnn --iters $(ARM_ITERS) --batch 16 --out $(ARM_RUN)
	$(PY) -m models.arm.build_table --checkpoint $(ARM_RUN)/model.safetensors
	$(PY) -m models.arm.evaluate --checkpoint $(ARM_RUN)/model.safetensors
	mkdir -p models/arm/weights/arm-fsrcnn
	cp $(ARM_RUN)/model.safetensors $(ARM_RUN)/manifest.json models/arm/weights/arm-fsrcnn/

bench: venv
	$(PY) -m bench.sr_tradeoff --checkpoint models/arm/weights/arm-fsrcnn/model.safetensors

# Container image (docs/DEPLOY.md). A torch wheel of the chosen version and variant found in
# WHEEL_SRC is copied into .wheels/ first, so the build needs no PyTorch index; without one the
# Dockerfile downloads torch from https://download.pytorch.org/whl/$(TORCH_VARIANT).
DOCKER ?= docker
IMAGE ?= anytime-serve:latest
TORCH_VERSION ?= 2.13.0
TORCH_VARIANT ?= cpu
WHEEL_SRC ?= /opt/wheels
ANYTIME_DEVICE ?= $(if $(filter cpu,$(TORCH_VARIANT)),cpu,cuda)

wheels:
	mkdir -p .wheels
	@set -e; for w in $(WHEEL_SRC)/torch-$(TORCH_VERSION)+$(TORCH_VARIANT)-*.whl; do \
	  if [ -f "$$w" ]; then cp -u "$$w" .wheels/ && echo "copied $$w into .wheels/"; \
	  else echo "no torch-$(TORCH_VERSION)+$(TORCH_VARIANT) wheel in $(WHEEL_SRC): the build downloads it"; fi; \
	done

image: wheels
	$(DOCKER) build -t $(IMAGE) --build-arg TORCH_VERSION=$(TORCH_VERSION) \
	  --build-arg TORCH_VARIANT=$(TORCH_VARIANT) --build-arg ANYTIME_DEVICE=$(ANYTIME_DEVICE) .

clean:
	rm -rf $(VENV) .pytest_cache
