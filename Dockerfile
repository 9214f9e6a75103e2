# Chatterbox TTS worker for RunPod serverless.
#   docker build -t chatterbox-worker .                                # weights baked in (default)
#   docker build --build-arg BAKE_WEIGHTS=0 -t chatterbox-worker .     # weights from the volume / Hub
#   docker build --build-arg VARIANT=turbo -t chatterbox-turbo .       # another model (original, turbo, multilingual)
# torch's CUDA wheels carry the CUDA runtime; the host's driver does the rest,
# so a slim Python base is enough (no CUDA base image needed). The torch that
# ships is PyPI's own build (CUDA 13.0: NVIDIA driver 580 or newer).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build
COPY requirements.txt ./
COPY requirements/torch-cuda.txt ./requirements/
# The runtime lock is complete: --no-deps keeps chatterbox-tts from pulling
# torch 2.6, gradio and other extras that inference never uses. torchaudio's
# compiled library is removed, as on the test machines (where it cannot load
# beside the CPU torch): the image runs the same pure-Python parts the tests do.
RUN pip install --no-deps -r requirements.txt \
 && pip install -r requirements/torch-cuda.txt \
 && rm -f "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"/torchaudio/lib/*.so
# librosa's numba functions compile on first use, ~12 s of every cold start:
# compile them here, for a generic x86-64 CPU so that the cache holds on any host.
ENV NUMBA_CACHE_DIR=/opt/numba-cache NUMBA_CPU_NAME=generic
RUN python -c "import numpy as np, librosa; a = np.random.rand(48000).astype(np.float32); \
librosa.resample(a, orig_sr=24000, target_sr=16000); librosa.effects.trim(a); librosa.effects.split(a)"
COPY chatterbox_worker ./chatterbox_worker
COPY builder ./builder
ARG VARIANT=original
# multilingual only: v3 bakes t3_mtl23ls_v3.safetensors (run with CHATTERBOX_MTL_T3=v3)
ARG MTL_T3=v2
ARG BAKE_WEIGHTS=1
RUN mkdir -p /opt/chatterbox/weights \
 && if [ "$BAKE_WEIGHTS" = "1" ]; then \
      python builder/fetch_models.py --variant "$VARIANT" --mtl-t3 "$MTL_T3" --dest /opt/chatterbox/weights; \
    fi

FROM ${PYTHON_IMAGE}
ARG BAKE_WEIGHTS=1
# The model the image serves by default: the one whose weights were baked.
# CHATTERBOX_VARIANT at run time still picks another (the RunPod Hub's model
# choice): its weights then come from the volume's cache or, once, the Hub.
# A worker serving the baked model never reaches the Hub (the baked copy is
# the first source it tries), so the network is not switched off here.
ARG VARIANT=original
# multilingual: which T3 weights were baked, served by default too.
ARG MTL_T3=v2
# The account the worker runs as; root keeps root (also settable at run time).
ARG WORKER_USER=worker
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 \
    CHATTERBOX_BAKED_DIR=/opt/chatterbox/weights CHATTERBOX_VARIANT=${VARIANT} \
    HF_HOME=/tmp/hf-home NUMBA_CACHE_DIR=/opt/numba-cache NUMBA_CPU_NAME=generic \
    HF_HUB_DISABLE_TELEMETRY=1 WORKER_USER=${WORKER_USER} CHATTERBOX_MTL_T3=${MTL_T3}
RUN useradd --create-home --uid 1000 worker \
 && mkdir -p /app/voices /app/output \
 && chown worker:worker /app/voices /app/output
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/chatterbox/weights /opt/chatterbox/weights
COPY --from=builder --chown=worker:worker /opt/numba-cache /opt/numba-cache
WORKDIR /app
COPY builder/entrypoint.sh /usr/local/bin/chatterbox-entrypoint
COPY chatterbox_worker ./chatterbox_worker
COPY handler.py test_input.json ./
RUN python -m compileall -q chatterbox_worker
# Starts as root only to make the voices directory on a root-owned network
# volume (/runpod-volume) the worker's, then runs the worker as WORKER_USER.
ENTRYPOINT ["/bin/sh", "/usr/local/bin/chatterbox-entrypoint"]
CMD ["python", "-u", "handler.py"]
