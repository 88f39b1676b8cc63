# syntax=docker/dockerfile:1
#
# stepup-gateway container image.
#
#   docker build -t stepup-gateway:0.1.0 .
#   docker run --read-only --tmpfs /tmp -p 8080:8080 \
#     -v "$PWD/config.yaml:/etc/stepup-gateway/config.yaml:ro" \
#     -e OIDC_CLIENT_SECRET -e GATEWAY_SESSION_SECRET stepup-gateway:0.1.0
#
# Both stages use the same base image: the venv built in the first one refers to the
# interpreter at /usr/local/bin/python3.11 and is copied unchanged into the second.
# Pin a digest for reproducible builds: --build-arg PYTHON_IMAGE=python:3.11-slim@sha256:...
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
RUN python -m venv /opt/venv
# Only what the wheel is built from; see .dockerignore.
COPY pyproject.toml README.md LICENSE requirements.lock ./
# Every dependency from the hashed lock (scripts/lock refreshes it), before the source,
# so this layer is reused while only the code changes.
RUN /opt/venv/bin/pip install --no-cache-dir --require-hashes -r requirements.lock
COPY gateway ./gateway
# pip compiles every module to .pyc while installing, so the read-only runtime image
# never needs to write bytecode. --no-deps: nothing is resolved beyond the lock.
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation .

FROM ${PYTHON_IMAGE} AS runtime
# uid/gid 10001: above the range distributions hand out to system and login users,
# so it never maps to a real account on the host (and is numeric for runAsNonRoot).
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin gateway
COPY --from=builder /opt/venv /opt/venv
# PYTHONDONTWRITEBYTECODE: nothing is written outside /tmp, so the root filesystem can
# be mounted read-only. PYTHONUNBUFFERED: log lines leave the process as they happen.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_CONFIG=/etc/stepup-gateway/config.yaml
USER 10001:10001
EXPOSE 8080
# Standard library only (the slim image has no curl). No proxy handler: an HTTP_PROXY in
# the container's environment must not send the probe elsewhere. Override the URL with
# GATEWAY_HEALTHCHECK_URL when server.listen or server.internal_prefix differ.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as r; url = os.environ.get('GATEWAY_HEALTHCHECK_URL', 'http://127.0.0.1:8080/_gateway/healthz'); sys.exit(0 if r.build_opener(r.ProxyHandler({})).open(url, timeout=4).status == 200 else 1)"]
ENTRYPOINT ["stepup-gateway"]
CMD ["run"]
