# FedCLIP's dependencies on Flower's official image, for a deployment (docker/compose.yml):
#   CUDA PyTorch (SuperNodes with a GPU): --build-arg BASE_IMAGE=flwr/supernode:1.28.0
#   CPU PyTorch (the SuperLink, and SuperNodes without one):
#       --build-arg BASE_IMAGE=flwr/superlink:1.28.0 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Build from the repository root (.dockerignore sends pyproject.toml, README.md, docker/requirements.py
# and the three packages). `flwr run` ships the app (a FAB) to the SuperLink, which runs the ServerApp
# from it, and to each site's warm ClientApp (`fedclip-clientapp`, gate/warm.py), which loads the
# ClientApp from it. The warm runner itself comes from this image, the site's own installation, so that
# it can check a FAB before any of the FAB's code runs: the last layer installs this package (without
# dependencies, seconds to rebuild); the dependencies' layers are rebuilt only when pyproject.toml's
# dependencies change, PyTorch's only when its pins or TORCH_INDEX_URL do. Flower's superlink and
# supernode images differ only in their entrypoint, so one image serves every role (compose sets it).
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
# the site's installation of this package: `fedclip-clientapp` (and `fedclip-predict`); its dependencies are above
COPY --chown=app:app pyproject.toml README.md /tmp/fedclip/
COPY --chown=app:app common /tmp/fedclip/common
COPY --chown=app:app client_app /tmp/fedclip/client_app
COPY --chown=app:app gate /tmp/fedclip/gate
COPY --chown=app:app predict /tmp/fedclip/predict
COPY --chown=app:app server_app /tmp/fedclip/server_app
RUN python -m pip install --no-cache-dir --no-deps /tmp/fedclip && rm -rf /tmp/fedclip
