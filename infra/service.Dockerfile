# The HTTP service's image (`render serve`: the job API and the web console). Light: the producer's dependencies
# and the serve extra only, no torch and no models, so it builds in a minute and starts in a second; it talks to
# the farm through Redis and the storage like any client. Versions come from constraints.txt, the lock the worker
# image and `make install` use too. Its build context is infra/service.Dockerfile.dockerignore (BuildKit reads
# the ignore file beside the Dockerfile in place of the root .dockerignore, which is the worker image's).
#   docker build -f infra/service.Dockerfile -t render-farm-api .
FROM python:3.11.7-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# A numeric user, so Kubernetes can verify runAsNonRoot.
RUN useradd --create-home --uid 10001 --gid 0 render \
    && mkdir -p /app \
    && chown 10001:0 /app

WORKDIR /app
# Dependencies first, in their own layer: pyproject's own list (the producer's dependencies plus the serve extra).
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['serve']))" > /tmp/requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r /tmp/requirements.txt dumb-init==1.2.5.post1 \
    && rm /tmp/requirements.txt

# The `render` command lives in worker/ (it imports the heavy parts only for the commands that render).
COPY README.md LICENSE ./
COPY producer ./producer
COPY worker ./worker
COPY service ./service
RUN pip install --no-cache-dir --no-deps .

USER 10001
EXPOSE 8080
# Alive while the process answers /healthz (it touches nothing); Redis and storage are /readyz's business.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["dumb-init", "--"]
# Without RENDER_API_KEYS, `render serve` refuses to bind 0.0.0.0 (exit 2): the image never serves open.
CMD ["render", "serve", "--host", "0.0.0.0", "--port", "8080"]
