# A local stand-in for Flower's flwr/superlink and flwr/supernode images, for machines that cannot
# reach Docker Hub; built by docker/local-base.sh, which documents why and how. Laid out as the
# official images are: Python in a venv at /python/venv on the PATH, flwr installed there, user
# `app` (uid/gid 49999) owning the venv and /app, working directory /app, HOME=/app, and the
# Flower command as entrypoint. docker/deploy.Dockerfile builds unchanged on either.
ARG DEBIAN_IMAGE=fedclip-local/debian-py:bookworm
FROM ${DEBIAN_IMAGE} AS base
# pip's trust and configuration for this machine's package registry (local builds only; see local-base.sh)
COPY registry/ /etc/
RUN useradd --no-create-home --home-dir /app --uid 49999 --user-group --shell /bin/sh app \
 && mkdir -p /app && chown app:app /app \
 && python3 -m venv /python/venv && chown -R app:app /python
ENV PATH=/python/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONIOENCODING=UTF-8 \
    LANG=C.UTF-8 \
    LC_ALL=C.UTF-8
USER app
ARG FLWR_VERSION=1.28.0
RUN pip install --no-cache-dir "flwr==${FLWR_VERSION}"
WORKDIR /app
ENV HOME=/app

FROM base AS superlink
ENTRYPOINT ["flower-superlink"]

FROM base AS supernode
ENTRYPOINT ["flower-supernode"]
