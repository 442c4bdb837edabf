# torchserve-explain on TorchServe's image conventions: user model-server, /home/model-server/
# {config.properties, metrics.yaml, model-store/}, ports 8080 (inference), 8081 (management),
# 8082 (metrics, Prometheus format). Put the MARs in model_store/ first (./build_mar.sh demo, or yours).
#
# Where a registry is reachable, on TorchServe's image (the default base):
#   docker build -t torchserve-explain:0.1.0 .
#   GPU: --build-arg BASE_IMAGE=pytorch/torchserve:0.12.0-gpu --build-arg TORCH_INDEX_URL=
# Where none is (this project's machines), with podman on a base made from Debian's packages:
#   ./build_image.sh build        # scripts/image.py; built and served by tests/test_container.py
# Then: docker|podman run --rm -p 127.0.0.1:8080:8080 -p 127.0.0.1:8082:8082 IMAGE  (docs/deployment.md)
ARG BASE_IMAGE=pytorch/torchserve:0.12.0-cpu
FROM ${BASE_IMAGE}

USER root
# An extra index for torch's CPU wheels on the default base; empty: the configured indexes only.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# pip settings for machines with local wheel folders, constraints or a TLS proxy: scripts/image.py
# passes the building machine's (and bind-mounts the folders and files they name). Unset by default.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CONSTRAINT
ARG PIP_CERT
ARG PIP_DEFAULT_TIMEOUT
# The handlers' libraries, pinned as in setup.cfg: the workers run the versions the MARs were tested with.
COPY deploy/requirements.txt /tmp/requirements.txt
RUN python -m pip install --no-cache-dir --disable-pip-version-check \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY deploy/entrypoint.sh /usr/local/bin/torchserve-explain-entrypoint
COPY deploy/ready.py /usr/local/bin/torchserve-explain-ready
# Configuration and MARs belong to root, readable by all: the server cannot change them.
COPY deploy/config.properties deploy/metrics.yaml /home/model-server/
COPY model_store/ /home/model-server/model-store/
RUN chmod 0755 /usr/local/bin/torchserve-explain-entrypoint /usr/local/bin/torchserve-explain-ready \
 && chmod -R a+rX /home/model-server/config.properties /home/model-server/metrics.yaml /home/model-server/model-store

# TorchServe runs as model-server. Token authorization is on (TorchServe's default): key_file.json is
# written in WORKDIR with new random keys at each start (read it with `podman exec CONTAINER cat
# /home/model-server/key_file.json`); behind a load balancer see docs/deployment.md. TorchServe 0.12
# wants that key on /ping too: `torchserve-explain-ready` (an exec probe) reads it and pings.
USER model-server
WORKDIR /home/model-server
EXPOSE 8080 8081 8082
ENTRYPOINT ["/usr/local/bin/torchserve-explain-entrypoint"]
CMD ["--ncs", "--ts-config", "/home/model-server/config.properties", \
     "--model-store", "/home/model-server/model-store", "--models", "all"]
