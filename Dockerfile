# Chatterbox TTS worker for RunPod serverless.
#   docker build -t chatterbox-worker .                         # weights baked in
#   docker build --build-arg BAKE_WEIGHTS=0 -t chatterbox-worker .   # weights from the volume/Hub
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

FROM ${CUDA_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HOME=/opt/hf-home
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM base AS builder
WORKDIR /app
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements.txt requirements/torch-cuda.txt ./requirements/
RUN pip install --no-deps -r requirements/requirements.txt \
 && pip install -r requirements/torch-cuda.txt
COPY chatterbox_worker ./chatterbox_worker
COPY builder ./builder
ARG VARIANT=original
ARG BAKE_WEIGHTS=1
RUN mkdir -p /opt/chatterbox/weights \
 && if [ "$BAKE_WEIGHTS" = "1" ]; then \
      python builder/fetch_models.py --variant "$VARIANT" --dest /opt/chatterbox/weights; \
    fi

FROM base
WORKDIR /app
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/chatterbox/weights /opt/chatterbox/weights
COPY chatterbox_worker ./chatterbox_worker
COPY handler.py test_input.json ./
ENV PATH=/opt/venv/bin:$PATH CHATTERBOX_BAKED_DIR=/opt/chatterbox/weights
CMD ["python", "-u", "handler.py"]
