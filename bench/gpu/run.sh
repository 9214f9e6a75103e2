#!/usr/bin/env bash
# The GPU benchmarks on a lent GPU machine, in one go, within BUDGET_S seconds (default 450).
#
# That machine has Python 3.12, torch, torchaudio, transformers, safetensors,
# numpy, scipy, einops, onnx and numba, no registry access, and not the rest
# of what Chatterbox needs. Prepare the wheels here first (git-ignored):
#     bash bench/gpu/fetch_wheels.sh          # -> wheels/ (about 20 MB)
# then run, through the device tool, with `wheels` in `carry`:
#     bash bench/gpu/run.sh                   # results in $OUT (default ./gpu-results)
# SIZE=tiny TOKENS=40 bash bench/gpu/run.sh   # a quick check of the script itself (CPU too)
#
# Steps, most important first, each bounded so the whole script ends within
# BUDGET_S (install and the full-size checkpoint, ~40 s, included):
#   1. install the carried wheels (SKIP_INSTALL=1 skips: a prepared venv, e.g.
#      PYTHON=.venv/bin/python SKIP_INSTALL=1 SIZE=tiny TOKENS=40 bash bench/gpu/run.sh);
#   2. build the random checkpoint (SIZE=full|tiny);
#   3. bench/gpu/vocoder_graphs.py: the vocoder's flow solve under CUDA graphs vs eager (same
#      mels? seconds per call), at most ~150 s (VOCODER_GRAPHS=0 skips it); then
#      bench/gpu/decoder_graphs.py: T3's decoders, the original's and turbo's (a tiny turbo
#      checkpoint), graphed vs eager, at most ~120 s (DECODER_GRAPHS=0 skips it);
#   4. bench/throughput_bench.py: upstream baseline, batch-1 decode per format,
#      streamed then one-shot concurrency rows, with --max-seconds = what is left
#      minus STREAM_RESERVE_S; rows that would not fit are skipped and reported;
#   5. bench/stream_bench.py in the time left (STREAM_BENCH=0 skips it);
#   6. bench/variants_bench.py (each model vs its upstream class) in the time left,
#      if at least 120 s (VARIANTS_BENCH=0 skips it). The default budget leaves it
#      none; a variants-only run: THROUGHPUT_BENCH=0 STREAM_BENCH=0 bash bench/gpu/run.sh
#      (not yet tried on a GPU; it builds the turbo and multilingual checkpoints, ~40 s each
#      on CPU, then loads each model twice: give it BUDGET_S=400 or so at 250 tokens).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-results}
SIZE=${SIZE:-full}
TOKENS=${TOKENS:-250}
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-450}
STREAM_BENCH=${STREAM_BENCH:-1}
STREAM_RESERVE_S=${STREAM_RESERVE_S:-90}
THROUGHPUT_BENCH=${THROUGHPUT_BENCH:-1}
VARIANTS_BENCH=${VARIANTS_BENCH:-1}
mkdir -p "$OUT"
export HF_HOME=${HF_HOME:-/tmp/cbw-hf} HF_HUB_OFFLINE=1 PYTHONPATH=$PWD

# Only what the machine lacks, from the carried wheels; never the network.
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  "$PYTHON" -m pip install --quiet --no-index --find-links "${WHEELS:-wheels}" --no-deps -r bench/gpu/wheels.txt \
    2>&1 | tee "$OUT/install.log" | grep -v "is ignored" || true
fi
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
echo "ready after ${SECONDS}s"

if [ "$DEVICE" = cuda ]; then
  FORMATS=${FORMATS:-bfloat16,float32}
  CONCURRENCY=${CONCURRENCY:-1,8,32,64}
else
  FORMATS=${FORMATS:-float32}
  CONCURRENCY=${CONCURRENCY:-1,2}
fi
# The vocoder's CUDA graphs vs eager: same mels, and how much faster (VOCODER_GRAPHS=0 skips).
if [ "${VOCODER_GRAPHS:-1}" != 0 ]; then
  status=0
  timeout 150 "$PYTHON" bench/gpu/vocoder_graphs.py --checkpoint "$CKPT" --device "$DEVICE" \
    --max-seconds 90 --out "$OUT/vocoder-graphs-$SIZE-$DEVICE.json" 2> "$OUT/vocoder-graphs.stderr.log" \
    | tee "$OUT/vocoder-graphs-$SIZE-$DEVICE.md" || status=$?
  echo "vocoder graphs check: exit $status after ${SECONDS}s"
fi

# T3's decoders (the original's and turbo's) with CUDA graphs vs eager (DECODER_GRAPHS=0 skips).
if [ "${DECODER_GRAPHS:-1}" != 0 ]; then
  TURBO_CKPT=/tmp/cbw-bench-turbo-tiny
  if [ ! -f "$TURBO_CKPT/t3_turbo_v1.safetensors" ]; then
    "$PYTHON" -m chatterbox_worker.tiny_model "$TURBO_CKPT" --variant turbo --size tiny > /dev/null
  fi
  status=0
  timeout 120 "$PYTHON" bench/gpu/decoder_graphs.py --checkpoint "$CKPT" --turbo-checkpoint "$TURBO_CKPT" \
    --device "$DEVICE" 2> "$OUT/decoder-graphs.stderr.log" | tee "$OUT/decoder-graphs-$SIZE-$DEVICE.md" || status=$?
  echo "decoder graphs check: exit $status after ${SECONDS}s"
fi

reserve=0
if [ "$STREAM_BENCH" != 0 ]; then reserve=$STREAM_RESERVE_S; fi
left=$((BUDGET_S - SECONDS - reserve - 5))
if [ "$THROUGHPUT_BENCH" = 0 ]; then
  echo "throughput bench skipped: THROUGHPUT_BENCH=0"
elif [ "$left" -ge 60 ]; then
  status=0
  "$PYTHON" bench/throughput_bench.py --checkpoint "$CKPT" --tokens "$TOKENS" --device "$DEVICE" \
    --formats "$FORMATS" --concurrency "$CONCURRENCY" --repeats "${REPEATS:-1}" \
    --upstream-jobs "${UPSTREAM_JOBS:-2}" --max-seconds "$left" \
    --out "$OUT/throughput-$SIZE-$DEVICE.json" 2> "$OUT/throughput.stderr.log" \
    | tee "$OUT/throughput-$SIZE-$DEVICE.md" || status=$?
  echo "throughput bench: exit $status after ${SECONDS}s; results: $OUT/throughput-$SIZE-$DEVICE.json"
else
  echo "throughput bench skipped: only ${left}s left of BUDGET_S=$BUDGET_S"
fi

left=$((BUDGET_S - SECONDS - 5))
if [ "$STREAM_BENCH" != 0 ] && [ "$left" -ge 45 ]; then
  status=0
  timeout "$left" "$PYTHON" bench/stream_bench.py --checkpoint "$CKPT" --tokens "$TOKENS" --device "$DEVICE" \
    --out "$OUT/results-$SIZE-$DEVICE.json" 2> "$OUT/bench.stderr.log" || status=$?
  echo "stream bench: exit $status after ${SECONDS}s; results: $OUT/results-$SIZE-$DEVICE.json"
elif [ "$STREAM_BENCH" != 0 ]; then
  echo "stream bench skipped: only ${left}s left of BUDGET_S=$BUDGET_S"
fi

# Each model vs its upstream class; the original's checkpoint is the one built above.
left=$((BUDGET_S - SECONDS - 5))
if [ "$VARIANTS_BENCH" != 0 ] && [ "$left" -ge 120 ]; then
  VDIR=/tmp/cbw-variants-bench
  mkdir -p "$VDIR"
  [ -e "$VDIR/original-$SIZE" ] || ln -s "$CKPT" "$VDIR/original-$SIZE"
  status=0
  "$PYTHON" bench/variants_bench.py --checkpoint-dir "$VDIR" --size "$SIZE" --tokens "$TOKENS" \
    --device "$DEVICE" --max-seconds "$left" --out "$OUT/variants-$SIZE-$DEVICE.json" \
    2> "$OUT/variants.stderr.log" | tee "$OUT/variants-$SIZE-$DEVICE.md" || status=$?
  echo "variants bench: exit $status after ${SECONDS}s; results: $OUT/variants-$SIZE-$DEVICE.json"
elif [ "$VARIANTS_BENCH" != 0 ]; then
  echo "variants bench skipped: only ${left}s left of BUDGET_S=$BUDGET_S"
fi
echo "done in ${SECONDS}s"
