# The FedCLIP app on Flower's official images, for a deployment (docker/compose.yml):
#   SuperNode, CUDA PyTorch:  --build-arg BASE_IMAGE=flwr/supernode:1.28.0
#   SuperNode, CPU PyTorch:   --build-arg BASE_IMAGE=flwr/supernode:1.28.0 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
#   SuperLink + ServerApp:    --build-arg BASE_IMAGE=flwr/superlink:1.28.0 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The image keeps its base's entrypoint (flower-supernode / flower-superlink); the ClientApp and the
# ServerApp run in a subprocess of it (Flower's default isolation), from the FAB that `flwr run` sends,
# with the dependencies installed here. Build from the repository root. Not built in this project's
# CI (no Docker engine there); `docker compose config` checks the compose file.
ARG BASE_IMAGE=flwr/supernode:1.28.0
FROM ${BASE_IMAGE}
ARG TORCH_INDEX_URL=https://pypi.org/simple

USER root
RUN mkdir -p /cache /outputs /state && chown app:app /cache /outputs /state
USER app

WORKDIR /app
COPY --chown=app:app pyproject.toml README.md ./
COPY --chown=app:app common common
COPY --chown=app:app client_app client_app
COPY --chown=app:app server_app server_app
COPY --chown=app:app conf conf
# flwr is already in the base image (without the simulation extra, which a deployment does not use)
RUN sed -i 's/.*flwr\[simulation\].*//' pyproject.toml \
 && python -m pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1 --index-url ${TORCH_INDEX_URL} \
 && python -m pip install --no-cache-dir .
ENV FEDCLIP_CACHE=/cache FEDCLIP_OUTPUTS=/outputs HF_HOME=/cache/huggingface
