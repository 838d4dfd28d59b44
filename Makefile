# Two commands on a fresh machine: `make serve` and `make test`.
# The venv is created on first use; torch is pinned to the CPU wheel first so that no
# resolver ever pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv serve test test-fast data model bench clean wheels image

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

# The fast tier (about 3 minutes on 2 cores): everything but the tests that start a server process,
# train, or run Prometheus or a browser (those are marked slow).
test-fast: venv
	$(PY) -m pytest -q -m "not slow"

# Offline data (Debian packages; needs root): photos for ARM's training, tables and benchmarks,
# and the font families the glyph classification set is rendered from (docs/DATA_GLYPHS.md;
# the same list is models/glyphs/fonts.py's PACKAGES, which a test keeps in step).
GLYPH_FONTS := fonts-dejavu-core fonts-dejavu-extra fonts-liberation2 fonts-freefont-ttf \
   fonts-urw-base35 fonts-texgyre fonts-lmodern fonts-croscore fonts-crosextra-caladea \
   fonts-crosextra-carlito fonts-ebgaramond fonts-linuxlibertine fonts-sil-gentiumplus \
   fonts-sil-charis fonts-cardo fonts-vollkorn fonts-oldstandard fonts-goudybookletter \
   fonts-yrsa-rasa fonts-century-catalogue fonts-prociono fonts-paratype fonts-linex fonts-junicode \
   fonts-arkpandora fonts-noto-mono fonts-noto-core fonts-adf-accanthis fonts-adf-baskervald \
   fonts-adf-berenis fonts-adf-gillius fonts-adf-ikarius fonts-adf-irianis fonts-adf-libris \
   fonts-adf-mekanus fonts-adf-oldania fonts-adf-romande fonts-adf-switzera fonts-adf-tribun \
   fonts-adf-universalis fonts-adf-verana fonts-cantarell fonts-open-sans fonts-roboto-unhinted \
   fonts-lato fonts-inter fonts-cabin fonts-dosis fonts-quicksand fonts-comfortaa \
   fonts-league-spartan fonts-sil-andika fonts-b612 fonts-jura fonts-play fonts-yanone-kaffeesatz \
   fonts-averia-gwf fonts-averia-sans-gwf fonts-averia-serif-gwf fonts-tuffy fonts-go \
   fonts-millimetre fonts-routed-gothic fonts-okolaks fonts-beteckna fonts-hack fonts-inconsolata \
   fonts-firacode fonts-jetbrains-mono fonts-anonymous-pro fonts-mononoki fonts-monoid \
   fonts-courier-prime fonts-agave fonts-hermit fonts-3270 fonts-fantasque-sans fonts-ocr-a \
   fonts-ocr-b fonts-comic-neue fonts-dkg-handwriting fonts-dancingscript fonts-kristi \
   fonts-isabella fonts-femkeklaver fonts-breip fonts-klaudia-berenika fonts-lobster \
   fonts-lobstertwo fonts-ecolier-court fonts-blankenburg fonts-dustin

# ARM_PHOTOS is models/arm/data.py's PACKAGES (a test keeps them in step); the two Lomiri
# packages feed the `train-ext` split only.
ARM_PHOTOS := mate-backgrounds plasma-workspace-wallpapers lomiri-wallpapers-16.04 lomiri-wallpapers-20.04

data:
	apt-get install -y $(ARM_PHOTOS)
	apt-get install -y --no-install-recommends $(GLYPH_FONTS)

# Rebuild the bundled ARM-FSRCNN from scratch (about two hours on 2 cores; needs `make data`):
# phase 1 on the 19 wallpapers, phase 2 from its weights on split train-ext at a lower rate.
ARM_ITERS ?= 55000
ARM_RUN ?= runs/arm-fsrcnn
ARM_FT_ITERS ?= 50000
ARM_FT_RUN ?= runs/arm-fsrcnn-ft
model: venv
	$(PY) -m models.arm.train --backbone fsrcnn --iters $(ARM_ITERS) --batch 16 --out $(ARM_RUN)
	$(PY) -m models.arm.train --backbone fsrcnn --init $(ARM_RUN)/model.safetensors --train-split train-ext \
	    --iters $(ARM_FT_ITERS) --lr 3e-4 --batch 16 --out $(ARM_FT_RUN) --threads 1
	$(PY) -m models.arm.build_table --checkpoint $(ARM_FT_RUN)/model.safetensors
	$(PY) -m models.arm.evaluate --checkpoint $(ARM_FT_RUN)/model.safetensors
	mkdir -p models/arm/weights/arm-fsrcnn
	cp $(ARM_FT_RUN)/model.safetensors $(ARM_FT_RUN)/manifest.json models/arm/weights/arm-fsrcnn/

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
