# triton-mig-exporter: a multi-stage build in the style of prometheus-pve-exporter.
#
#   docker build -t triton-mig-exporter:0.1.0 .
#   docker run --rm -p 9410:9410 \
#     -v "$PWD/my.yaml:/etc/triton-mig-exporter/config.yaml:ro" triton-mig-exporter:0.1.0
#
# Stage 1 builds the project's wheel and installs it, with its dependencies (binary wheels only:
# no compiler is needed or present), into a venv at /opt/triton-mig-exporter. Stage 2 copies that
# venv onto a fresh copy of the same base image: no build tools, no wheels, no pip caches, and no
# pip or setuptools inside the venv. tests/test_deploy.py lints this file with hadolint and
# replays the build stage's RUN step and the ENTRYPOINT in a temporary root (no container engine).
#
# The image runs as uid/gid 10001 and writes nothing outside /tmp, so it works with a read-only
# root file system. Configuration comes from a mounted file (the documented defaults are baked in
# at the same path) and TRITON_MIG_EXPORTER_<SECTION>__<KEY> environment variables.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build

# Extra dependency groups to install, e.g. --build-arg EXTRAS=report for the historical report.
ARG EXTRAS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# Only what the wheel is built from (see .dockerignore).
COPY pyproject.toml README.md ./
COPY exporter/ exporter/

# The venv has no pip of its own: the base image's pip installs into it with --python.
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && python -m venv --without-pip /opt/triton-mig-exporter \
 && python -m pip --python /opt/triton-mig-exporter/bin/python install --no-cache-dir \
        --only-binary=:all: "$(echo /wheels/triton_mig_exporter-*.whl)${EXTRAS:+[${EXTRAS}]}" \
 && /opt/triton-mig-exporter/bin/triton-mig-exporter --version


FROM ${PYTHON_IMAGE}

LABEL org.opencontainers.image.title="triton-mig-exporter" \
      org.opencontainers.image.description="Fleet figures for NVIDIA Triton on MIG slices, derived from an upstream Prometheus and served on /metrics" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid/gid (not 0), so Kubernetes' runAsNonRoot can verify it without a passwd
# lookup; the entry exists anyway for tools that want a name.
RUN groupadd --system --gid 10001 exporter \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin exporter

COPY --from=build /opt/triton-mig-exporter /opt/triton-mig-exporter
# The documented defaults; mount your own file (or a ConfigMap) over this path.
COPY config.yaml /etc/triton-mig-exporter/config.yaml

# Read-only root file system: no bytecode writes (the venv is compiled at install time), and
# anything that wants a cache or temp dir (matplotlib with EXTRAS=report) gets one under /tmp.
ENV PATH=/opt/triton-mig-exporter/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache

USER 10001:10001
WORKDIR /tmp
EXPOSE 9410

ENTRYPOINT ["/opt/triton-mig-exporter/bin/triton-mig-exporter", "serve"]
CMD ["--config.file=/etc/triton-mig-exporter/config.yaml"]
