# The GPU worker: CUDA PyTorch, the project with its worker extra, a non-root user, a model cache volume.
# The CPU-only test path (make install / make test) does not use this file.
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/models \
    HF_HUB_OFFLINE=1

RUN useradd --create-home --uid 10001 render \
    && mkdir -p /models /app \
    && chown render:render /models /app

WORKDIR /app
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
# torch comes from the base image (CUDA build); pip keeps it because it satisfies the worker extra.
RUN pip install --no-cache-dir '.[worker]'

USER render
VOLUME ["/models"]
CMD ["render", "worker", "--hostname", "gpu@%h"]
