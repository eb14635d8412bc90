# FedCLIP's dependencies on Flower's official image, for a deployment (docker/compose.yml):
#   CUDA PyTorch (SuperNodes with a GPU): --build-arg BASE_IMAGE=flwr/supernode:1.28.0
#   CPU PyTorch (the SuperLink, and SuperNodes without one):
#       --build-arg BASE_IMAGE=flwr/superlink:1.28.0 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Build from the repository root (.dockerignore sends only pyproject.toml and docker/requirements.py).
# The image holds no app code: `flwr run` ships the app (a FAB) to the SuperLink and the SuperNodes,
# which run the ServerApp and the ClientApps in subprocesses (Flower's default isolation) with the
# packages installed here, so the image is rebuilt only when pyproject.toml's dependencies change,
# and PyTorch's layer only when its pins or TORCH_INDEX_URL do. Flower's superlink and supernode
# images differ only in their entrypoint, so one image serves both roles (compose sets it).
ARG BASE_IMAGE=flwr/supernode:1.28.0

FROM ${BASE_IMAGE} AS requirements
COPY --chown=app:app pyproject.toml docker/requirements.py /tmp/build/
RUN python /tmp/build/requirements.py /tmp/build

FROM ${BASE_IMAGE}
ARG TORCH_INDEX_URL=https://pypi.org/simple
USER root
RUN mkdir -p /cache /outputs /state && chown app:app /cache /outputs /state
USER app
COPY --from=requirements /tmp/build/torch.txt /tmp/requirements/
RUN python -m pip install --no-cache-dir -r /tmp/requirements/torch.txt --index-url ${TORCH_INDEX_URL}
COPY --from=requirements /tmp/build/app.txt /tmp/requirements/
RUN python -m pip install --no-cache-dir -r /tmp/requirements/app.txt
ENV FEDCLIP_CACHE=/cache FEDCLIP_OUTPUTS=/outputs HF_HOME=/cache/huggingface
