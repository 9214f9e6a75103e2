# Chatterbox TTS worker for RunPod serverless.
#   docker build -t chatterbox-worker .                                # weights baked in (default)
#   docker build --build-arg BAKE_WEIGHTS=0 -t chatterbox-worker .     # weights from the volume / Hub
# torch's CUDA wheels carry the CUDA runtime; the host's driver does the rest,
# so a slim Python base is enough (no CUDA base image needed).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build
COPY requirements.txt ./
COPY requirements/torch-cuda.txt ./requirements/
# The runtime lock is complete: --no-deps keeps chatterbox-tts from pulling
# torch 2.6, gradio and other extras that inference never uses.
RUN pip install --no-deps -r requirements.txt \
 && pip install -r requirements/torch-cuda.txt
COPY chatterbox_worker ./chatterbox_worker
COPY builder ./builder
ARG VARIANT=original
ARG BAKE_WEIGHTS=1
RUN mkdir -p /opt/chatterbox/weights \
 && if [ "$BAKE_WEIGHTS" = "1" ]; then \
      python builder/fetch_models.py --variant "$VARIANT" --dest /opt/chatterbox/weights; \
    fi

FROM ${PYTHON_IMAGE}
ARG BAKE_WEIGHTS=1
ARG WORKER_USER=worker
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 \
    CHATTERBOX_BAKED_DIR=/opt/chatterbox/weights \
    HF_HOME=/tmp/hf-home NUMBA_CACHE_DIR=/tmp/numba-cache \
    HF_HUB_OFFLINE=${BAKE_WEIGHTS}
RUN useradd --create-home --uid 1000 worker \
 && mkdir -p /app/voices && chown worker /app/voices
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/chatterbox/weights /opt/chatterbox/weights
WORKDIR /app
COPY chatterbox_worker ./chatterbox_worker
COPY handler.py test_input.json ./
# Non-root by default. RunPod mounts the network volume at /runpod-volume; if
# it is root-owned and not writable, the worker starts anyway, says so in one
# log line and in `health`, and voice uploads fail with storage_unavailable:
# build with --build-arg WORKER_USER=root for such volumes.
USER ${WORKER_USER}
CMD ["python", "-u", "handler.py"]
