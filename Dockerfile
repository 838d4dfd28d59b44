# Anytime Serve: CPU image by default, CUDA by build argument.
#
#   docker build -t anytime-serve .                                   # CPU torch from the PyTorch CPU index
#   docker build -t anytime-serve:cu128 --build-arg TORCH_VARIANT=cu128 --build-arg ANYTIME_DEVICE=cuda .
#   make image                                                        # offline: a local wheel from .wheels/
#
# torch is installed first, from the PyTorch index of the chosen variant (never from PyPI,
# whose Linux wheel is a multi-GB CUDA build), or from a matching wheel in .wheels/ when one
# is there (torch-<TORCH_VERSION>+<TORCH_VARIANT>-cp<python>-*.whl; its small dependencies
# still come from PyPI). The project is installed after it, constrained to that torch.
# See docs/DEPLOY.md.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# 1. torch: a local wheel of exactly this version, variant and Python, else the variant's index.
COPY .wheels/ /tmp/wheels/
RUN set -eu; \
    py="cp$(python -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')"; \
    wheel="$(ls /tmp/wheels/torch-${TORCH_VERSION}+${TORCH_VARIANT}-${py}-${py}-*.whl 2>/dev/null | head -n 1 || true)"; \
    if [ -n "$wheel" ]; then \
        echo "torch from the local wheel $wheel"; \
        pip install "$wheel"; \
    else \
        echo "torch ${TORCH_VERSION}+${TORCH_VARIANT} from ${TORCH_INDEX_URL}"; \
        pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}+${TORCH_VARIANT}"; \
    fi; \
    python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > /opt/venv/torch-constraint.txt; \
    cat /opt/venv/torch-constraint.txt; \
    rm -rf /tmp/wheels

# 2. The project's other dependencies (own layer, so that a code change does not reinstall them),
#    constrained to the torch above: pip fails rather than fetch another torch.
WORKDIR /src
COPY pyproject.toml README.md ./
# A CUDA image adds the gpu extra (NVML: GPU utilisation in /v1/policy and the metrics); a CPU image
# the openvino extra (ONNX Runtime and OpenVINO, which the default ANYTIME_PSSNET_ENGINE=auto and
# ANYTIME_CFVIT_ENGINE=auto use where they are faster).
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
extra = p['optional-dependencies']['gpu' if '${TORCH_VARIANT}' != 'cpu' else 'openvino']; print('\n'.join(p['dependencies'] + extra))" \
        > /tmp/requirements.txt \
 && pip install -c /opt/venv/torch-constraint.txt -r /tmp/requirements.txt

# 3. The project itself, with the bundled weights (package data under models/arm/weights/).
COPY service/ service/
COPY models/ models/
COPY bench/ bench/
COPY compress/ compress/
COPY anytime_client/ anytime_client/
RUN pip install -c /opt/venv/torch-constraint.txt . \
 && pip check \
 && cd / && python -c "from service.config import BUNDLED_ARM; assert BUNDLED_ARM.is_file(), BUNDLED_ARM; print(BUNDLED_ARM)"


FROM python:${PYTHON_VERSION}-slim
ARG TORCH_VARIANT=cpu
ARG ANYTIME_DEVICE=cpu
LABEL org.opencontainers.image.title="anytime-serve" \
      org.opencontainers.image.description="HTTP inference server for adaptive-compute vision models" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.anytime.torch-variant="${TORCH_VARIANT}"
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/anytime --shell /usr/sbin/nologin anytime
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    ANYTIME_HOST=0.0.0.0 \
    ANYTIME_PORT=8000 \
    ANYTIME_DEVICE=${ANYTIME_DEVICE} \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /home/anytime
USER 10001:10001
EXPOSE 8000
# Liveness only (/healthz answers while the process is up); readiness is /readyz (see deploy/k8s).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('ANYTIME_PORT', '8000'), timeout=2)"
CMD ["python", "-m", "service"]
