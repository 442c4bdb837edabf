# torchserve-explain on TorchServe's own image (not built here: this project's machines have no
# container engine; see docs/deployment.md). Build after ./build_mar.sh has put your MARs in model_store/:
#   docker build -t torchserve-explain:0.1.0 .
#   docker run --rm -p 8080:8080 -p 8081:8081 -p 8082:8082 torchserve-explain:0.1.0
# GPU: --build-arg BASE_IMAGE=pytorch/torchserve:0.12.0-gpu and `docker run --gpus all ...`.
ARG BASE_IMAGE=pytorch/torchserve:0.12.0-cpu
FROM ${BASE_IMAGE}

USER root
# The handlers' libraries, pinned as in setup.cfg. torch/torchvision are pinned too, so that the
# workers run the versions the MARs were tested with (the base image ships its own; CPU wheels here,
# drop the index URL for the GPU image).
RUN python -m pip install --no-cache-dir \
        --extra-index-url https://download.pytorch.org/whl/cpu \
        torch==2.14.1 torchvision==0.29.1 \
        captum==0.9.0 transformers==5.23.0 tokenizers==0.23.3 "Pillow>=10" "numpy>=1.26" "PyYAML>=6"

# TorchServe's image conventions: /home/model-server/{config.properties,model-store}, user model-server.
COPY --chown=model-server:model-server deploy/config.properties /home/model-server/config.properties
COPY --chown=model-server:model-server model_store/ /home/model-server/model-store/
USER model-server
WORKDIR /home/model-server
EXPOSE 8080 8081 8082

# In the foreground so that the container lives as long as TorchServe. With token authorization on
# (the default), key_file.json is written in WORKDIR with random keys at each start; behind a load
# balancer, turn it off and authenticate at the ingress (docs/deployment.md).
CMD ["torchserve", "--start", "--foreground", "--ts-config", "/home/model-server/config.properties", \
     "--model-store", "/home/model-server/model-store", "--models", "all"]
