# The GPU worker image. torch comes from PyPI, whose Linux wheel is the CUDA build (its CUDA libraries arrive as
# nvidia-* wheels; the host needs only the NVIDIA driver and container toolkit), at the version CI tests with the
# CPU build: both resolve through constraints.txt, the one lock file `make install` also uses
# (tests/unit/test_deploy.py checks that the versions agree). Rebuild the lock with `make lock`.
#
# The base is pinned by tag. To pin it by digest as well, resolve the tag where a registry is reachable
# (`docker buildx imagetools inspect python:3.11.7-slim-bookworm`) and write FROM python:3.11.7-slim-bookworm@sha256:...
FROM python:3.11.7-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/models \
    HF_HUB_OFFLINE=1

# A numeric user, so Kubernetes can verify runAsNonRoot; /models is group-writable for an fsGroup.
RUN useradd --create-home --uid 10001 --gid 0 render \
    && mkdir -p /models /app \
    && chown 10001:0 /models /app \
    && chmod 2775 /models

WORKDIR /app
# Dependencies first, in their own layer: it is rebuilt only when pyproject.toml or the lock changes, not on
# every code edit. The list is pyproject's own (the producer's dependencies plus the worker extra).
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['worker']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt dumb-init==1.2.5.post1 \
    && rm /tmp/requirements.txt

COPY README.md LICENSE ./
COPY producer ./producer
COPY worker ./worker
RUN pip install --no-cache-dir --no-deps .

USER 10001
VOLUME ["/models"]
# Ready when the worker answers a Celery ping by its own name (it consumes its queues).
HEALTHCHECK --interval=30s --timeout=15s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os,sys; from producer.client import RenderClient; sys.exit(0 if RenderClient().app.control.ping(destination=['gpu@'+os.uname().nodename], timeout=5) else 1)"]
# dumb-init as PID 1: SIGTERM reaches the worker (its hand-off), and zombies are reaped.
ENTRYPOINT ["dumb-init", "--"]
CMD ["render", "worker", "--hostname", "gpu@%h"]
