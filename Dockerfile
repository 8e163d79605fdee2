# turret-forwarder as a sidecar image: the daemon as PID 1, non-root, backlog and socket on volumes.
#
# Build:  docker build -t turret-forwarder .
# Offline (CI): docker build --build-arg BASE=local/python:bookworm -t turret-forwarder .
# Configuration is by environment and secret files only (see README.md, "Configuration", and
# docs/deployment.md); the image sets the paths below and binds the metrics port on every interface so
# that Prometheus in another container can scrape it.

ARG BASE=python:3.12-slim

# Builder: the package and its dependencies in a venv; only the venv is copied to the final stage.
FROM ${BASE} AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY forwarder ./forwarder
# --without-pip, then the base's pip targets the venv: the runtime image carries no installer.
RUN python -m venv --without-pip /opt/turret-forwarder \
    && python -m pip --python /opt/turret-forwarder/bin/python install \
        --no-cache-dir --root-user-action=ignore --disable-pip-version-check /src

FROM ${BASE}
LABEL org.opencontainers.image.title="turret-forwarder" \
      org.opencontainers.image.description="A local, durable buffer that relays messages from web apps to the Turret.IO API" \
      org.opencontainers.image.licenses="MIT"

# Fixed ids: apps that share the socket volume join group 10001 (docs/deployment.md, "uid and gid").
# The socket directory is setgid and group-writable, so the socket and anything else made there belong
# to the forwarder's group; the backlog directory is private to the forwarder.
RUN groupadd --system --gid 10001 turret-forwarder \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /var/lib/turret-forwarder \
        --shell /usr/sbin/nologin turret-forwarder \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/turret-forwarder \
    && install -d -o 10001 -g 10001 -m 2770 /run/turret-forwarder

COPY --from=builder /opt/turret-forwarder /opt/turret-forwarder

ENV PATH=/opt/turret-forwarder/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FORWARDER_DATA_DIR=/var/lib/turret-forwarder \
    FORWARDER_SOCKET=/run/turret-forwarder/forwarder.sock \
    FORWARDER_METRICS_ADDR=0.0.0.0:9464

VOLUME ["/var/lib/turret-forwarder", "/run/turret-forwarder"]
EXPOSE 9464
USER 10001:10001

# `health` reads FORWARDER_SOCKET like `serve` does, so overriding the socket path keeps both in step.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["turret-forwarder", "health"]

# The daemon is PID 1 and handles SIGTERM itself (asyncio signal handler): `docker stop` drains and
# exits 0 within shutdown_timeout instead of waiting 10 s for SIGKILL.
ENTRYPOINT ["turret-forwarder"]
CMD ["serve"]
