#!/usr/bin/env bash
# The streaming benchmark on a lent GPU machine, in one go.
#
# That machine has Python 3.12, torch, torchaudio, transformers, safetensors,
# numpy, scipy, einops, onnx and numba, no registry access, and not the rest
# of what Chatterbox needs. Prepare the wheels here first (git-ignored):
#     bash bench/gpu/fetch_wheels.sh          # -> wheels/ (about 20 MB)
# then run, through the device tool, with `wheels` in `carry`:
#     bash bench/gpu/run.sh                   # results in $OUT (default ./gpu-results)
# SIZE=tiny TOKENS=40 bash bench/gpu/run.sh   # a quick check of the script itself
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-results}
SIZE=${SIZE:-full}
TOKENS=${TOKENS:-250}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export HF_HOME=${HF_HOME:-/tmp/cbw-hf} HF_HUB_OFFLINE=1 PYTHONPATH=$PWD

# Only what the machine lacks, from the carried wheels; never the network.
"$PYTHON" -m pip install --quiet --no-index --find-links "${WHEELS:-wheels}" --no-deps -r bench/gpu/wheels.txt \
  2>&1 | tee "$OUT/install.log" | grep -v "is ignored" || true
"$PYTHON" - <<'PY' > "$OUT/environment.txt" 2>&1
import torch, sys
print(sys.version)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(0))
PY
cat "$OUT/environment.txt"

CKPT=/tmp/cbw-bench-$SIZE
if [ ! -f "$CKPT/t3_cfg.safetensors" ]; then
  "$PYTHON" -m chatterbox_worker.tiny_model "$CKPT" --size "$SIZE" | tee "$OUT/checkpoint.json"
fi
DEVICE=$("$PYTHON" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
"$PYTHON" bench/stream_bench.py --checkpoint "$CKPT" --tokens "$TOKENS" --device "$DEVICE" \
  --out "$OUT/results-$SIZE-$DEVICE.json" 2> "$OUT/bench.stderr.log"
echo "results: $OUT/results-$SIZE-$DEVICE.json"
