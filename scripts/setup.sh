#!/usr/bin/env bash
# One command to install everything: a virtual environment in .venv with torch
# (CPU build unless a GPU is present), the pinned runtime lock and the test tools.
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# TORCH_FILE overrides the choice (e.g. requirements/torch-cpu.txt on a GPU host).
if [ -z "${TORCH_FILE:-}" ]; then
  TORCH_FILE=requirements/torch-cpu.txt
  command -v nvidia-smi >/dev/null 2>&1 && TORCH_FILE=requirements/torch-cuda.txt
fi
echo "setup: torch from $TORCH_FILE"
# The runtime lock is complete: --no-deps keeps chatterbox-tts from pulling
# torch 2.6, gradio and the other extras it declares but inference never uses.
"${PIP[@]}" install --quiet --no-deps -r requirements.txt
# torch after the lock, with its own dependencies: the lock already holds the
# pure-Python ones, and a CUDA build brings its nvidia-* libraries.
"${PIP[@]}" install --quiet -r "$TORCH_FILE"
"${PIP[@]}" install --quiet -r requirements/dev.txt

# torchaudio 2.11's compiled extension links CUDA and cannot load beside a CPU
# torch; without it torchaudio falls back to the pure-Python parts that
# Chatterbox uses. It is removed on every torch (and in the image, Dockerfile)
# so that the tests, GPU hosts and the image all run the same code.
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -f "$site"/torchaudio/lib/*.so

# Warm librosa's numba JIT cache once, so the first test or job does not pay it.
HF_HOME=${HF_HOME:-$PWD/.cache/huggingface} "$VENV/bin/python" - <<'PY'
import numpy as np, librosa
librosa.resample(np.zeros(1600, dtype=np.float32), orig_sr=16000, target_sr=24000)
PY
"$VENV/bin/python" -c "from chatterbox_worker.engine.quiet import filter_third_party_warnings as quiet; quiet()
import chatterbox, runpod, torch; print('setup: ok, torch', torch.__version__)"
