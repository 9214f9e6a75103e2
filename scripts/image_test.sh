#!/usr/bin/env bash
# Build the worker image and check it as a user would run it: the local test
# run, the RunPod worker path (the dev API), a non-root worker process, voices
# uploaded to a root-owned volume; prints the image size and the time from
# start to first answer.
#   bash scripts/image_test.sh
#
# Not part of .ci/run: it needs ~30 GB of free disk at its peak (measured) and ~10 min.
# The image is built without weights (BAKE_WEIGHTS=0) and runs a tiny random
# checkpoint made here (python -m chatterbox_worker.tiny_model), mounted.
# With a Docker daemon it uses `docker`; without one (as root, on Debian) it
# uses buildah and podman, installing them with apt-get when missing, on a
# Debian bookworm base image made with debootstrap (the official python image
# needs a registry), which trusts this machine's own CA certificates so that
# pip inside the build reaches the package index.
#
# Settings: KEEP=1 keeps the built image and the base image; SKIP_BUILD=1 then
# reuses the kept image (checks only); PORT (default 8765) for the dev API; PYTHON (default
# .venv/bin/python) makes the tiny checkpoint; ENGINE=docker|podman forces one.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
TAG=${IMAGE_TAG:-localhost/chatterbox-worker:image-test}
BASE_TAG=localhost/chatterbox-base:bookworm
NAME=chatterbox-image-test
PORT=${PORT:-8765}
KEEP=${KEEP:-0}
WORK=$(mktemp -d /tmp/chatterbox-image-test.XXXXXX)
chmod 755 "$WORK"   # the worker account in the container reads the checkpoint from here

log() { echo "image-test: $*" >&2; }
fail() {
  log "FAIL: $*"
  if ctr inspect "$NAME" >/dev/null 2>&1; then
    log "container log (last 40 lines):"; ctr logs "$NAME" 2>&1 | tail -n 40 >&2 || true
  fi
  exit 1
}

# ---- the engine -------------------------------------------------------------
if [ -z "${ENGINE:-}" ]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then ENGINE=docker; else ENGINE=podman; fi
fi
if [ "$ENGINE" = podman ]; then
  if ! command -v buildah >/dev/null || ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null \
     || ! command -v runc >/dev/null; then
    [ "$(id -u)" = 0 ] || fail "no Docker daemon, and installing buildah/podman needs root"
    log "installing buildah, podman, debootstrap, runc (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah podman debootstrap runc uidmap fuse-overlayfs >/dev/null
  fi
fi
# crun fails on these machines (rlimits, hybrid cgroups): runc, cgroupfs, explicit ulimits.
ctr() {
  if [ "$ENGINE" = docker ]; then docker "$@"; else podman --runtime runc --cgroup-manager cgroupfs "$@"; fi
}
LIMITS=(--ulimit nofile=20000:20000 --ulimit nproc=4096:4096)

cleanup() {
  status=$?
  ctr rm -f "$NAME" >/dev/null 2>&1 || true
  if [ "$KEEP" != 1 ]; then
    log "removing the test image, build containers and dangling layers (KEEP=1 keeps them)"
    ctr rmi -f "$TAG" >/dev/null 2>&1 || true
    if [ "$ENGINE" = podman ]; then
      buildah rm --all >/dev/null 2>&1 || true
      podman rmi -f "$BASE_TAG" >/dev/null 2>&1 || true
      podman image prune -f >/dev/null 2>&1 || true
    else
      docker image prune -f >/dev/null 2>&1 || true
    fi
  fi
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT

# ---- build ------------------------------------------------------------------
build_start=$SECONDS
if [ "${SKIP_BUILD:-0}" = 1 ] && ctr image inspect "$TAG" >/dev/null 2>&1; then
  log "SKIP_BUILD=1: using the existing $TAG"
elif [ "$ENGINE" = docker ]; then
  log "building with docker (BAKE_WEIGHTS=0)"
  docker build --build-arg BAKE_WEIGHTS=0 -t "$TAG" . || fail "docker build"
else
  if ! podman image exists "$BASE_TAG"; then
    log "making the base image: debootstrap bookworm minbase + python3 (~2 min)"
    rootfs=$WORK/rootfs
    debootstrap --variant=minbase \
      --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
      bookworm "$rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
      || { tail -n 20 "$WORK/debootstrap.log" >&2; fail "debootstrap"; }
    # HTTPS to the package index may pass a proxy whose CA only this machine trusts.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
      cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
      chroot "$rootfs" update-ca-certificates >/dev/null
    fi
    chroot "$rootfs" apt-get clean
    tar -C "$rootfs" -c . | podman import - "$BASE_TAG" >/dev/null || fail "podman import"
    rm -rf "$rootfs"
  fi
  log "building with buildah (BAKE_WEIGHTS=0, base $BASE_TAG)"
  buildah --cgroup-manager cgroupfs build --runtime runc "${LIMITS[@]}" --network host \
    --build-arg PYTHON_IMAGE="$BASE_TAG" --build-arg BAKE_WEIGHTS=0 -t "$TAG" . || fail "buildah build"
fi
build_s=$((SECONDS - build_start))
size_bytes=$(ctr image inspect --format '{{.Size}}' "$TAG")
size_gb=$(awk -v b="$size_bytes" 'BEGIN { printf "%.2f", b / 1e9 }')
log "built $TAG in ${build_s}s: ${size_gb} GB"
ctr run --rm "${LIMITS[@]}" --network none --entrypoint /bin/sh "$TAG" -c \
  'cd "$(python -c "import sysconfig; print(sysconfig.get_paths()[\"purelib\"])")" &&
   python -c "import torch, torchaudio; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_arch_list(), \"torchaudio\", torchaudio.__version__)" &&
   du -sh nvidia torch triton cuda* 2>/dev/null | sort -rh | head -n 5; du -sh /opt/venv' >&2 || fail "torch does not import in the image"

# ---- a tiny checkpoint and a root-owned "network volume" --------------------
log "making a tiny random checkpoint"
"$PYTHON" -m chatterbox_worker.tiny_model "$WORK/tiny" >/dev/null || fail "tiny checkpoint"
chmod -R a+rX "$WORK/tiny"
mkdir -m 755 "$WORK/volume"   # root-owned, as RunPod mounts /runpod-volume
MODEL=(-v "$WORK/tiny:/models/tiny:ro" -e CHATTERBOX_MODEL_DIR=/models/tiny)

# ---- 1. the local test run: python handler.py writes its audio ---------------
log "check: python handler.py (test_input.json) in the container"
ctr run --rm "${LIMITS[@]}" --network none "${MODEL[@]}" "$TAG" sh -c \
  'set -e; path=$(python -u handler.py); test -s "$path";
   echo "local run: wrote $path ($(wc -c < "$path") bytes) as uid $(id -u)"' \
  || fail "python handler.py did not write its audio"

# ---- 2. the worker path: RunPod's dev API, with the volume mounted ----------
log "check: the dev API with a root-owned volume at /runpod-volume"
start_ns=$(date +%s%N)
ctr run -d --name "$NAME" "${LIMITS[@]}" --network host "${MODEL[@]}" -v "$WORK/volume:/runpod-volume" \
  "$TAG" python -u handler.py --rp_serve_api --rp_api_host 127.0.0.1 --rp_api_port "$PORT" >/dev/null \
  || fail "container did not start"
job() {  # job JSON -> the last output item, as JSON
  curl -sf --max-time 300 -X POST "http://127.0.0.1:$PORT/runsync" -H 'Content-Type: application/json' -d @- \
    | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["output"][-1]))'
}
answer=""
for _ in $(seq 600); do
  if answer=$(echo '{"input": {"action": "health"}}' | job 2>/dev/null); then break; fi
  [ "$(ctr inspect --format '{{.State.Running}}' "$NAME")" = true ] || fail "the worker exited before answering"
  sleep 0.5
done
[ -n "$answer" ] || fail "no answer within 300 s"
first_answer_s=$(awk -v a="$start_ns" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
ctr logs "$NAME" 2>&1 | grep -E "loaded from|warm-up" >&2 || true
echo "$answer" | python3 -c 'import json, sys; h = json.load(sys.stdin); print("health:", json.dumps(h)); assert h["storage"]["voices"] == "ok", "voices storage not ok"' >&2 \
  || fail "health: the voices directory on the volume is not usable"

uid=$(ctr exec "$NAME" sh -c "awk '/^Uid:/ {print \$2}' /proc/1/status")
cmd=$(ctr exec "$NAME" sh -c "tr '\\0' ' ' < /proc/1/cmdline")
[ "$uid" != 0 ] || fail "the worker process runs as root"
log "worker process: uid $uid: $cmd"

gen_start=$SECONDS
echo '{"input": {"text": "Hello from the image test.", "seed": 1}}' | job \
  | python3 -c 'import base64, json, sys; o = json.load(sys.stdin); a = base64.b64decode(o["audio_base64"]); assert a[:4] == b"RIFF", o; print("generate:", o["format"], o["duration_s"], "s of audio,", len(a), "bytes")' >&2 \
  || fail "generate over the dev API"
log "generate answered in $((SECONDS - gen_start)) s"

python3 -c 'import json; t = json.load(open(".runpod/tests.json")); print(json.dumps({"input": next(x["input"] for x in t["tests"] if x["input"].get("action") == "upload_voice")}))' \
  | job | python3 -c 'import json, sys; o = json.load(sys.stdin); assert o.get("voice_id") == "hub-test", o; print("upload_voice:", o["voice_id"], o["size_bytes"], "bytes")' >&2 \
  || fail "voice upload to the root-owned volume"
echo '{"input": {"text": "In the uploaded voice.", "voice_id": "hub-test", "seed": 2}}' | job \
  | python3 -c 'import json, sys; o = json.load(sys.stdin); assert "audio_base64" in o, o; print("generate with the voice:", o["duration_s"], "s")' >&2 \
  || fail "generate with the uploaded voice"
voice_file=$WORK/volume/voices/hub-test.pth
[ -s "$voice_file" ] || fail "no $voice_file on the volume"
volume_owner=$(stat -c %U "$WORK/volume")
voice_owner=$(stat -c %u "$voice_file")
log "volume: /runpod-volume owned by $volume_owner, voices/hub-test.pth by uid $voice_owner"

echo
echo "image-test: PASS ($ENGINE)"
echo "  image size:            ${size_gb} GB without weights (${size_bytes} bytes); build ${build_s} s"
echo "  start to first answer: ${first_answer_s} s (tiny checkpoint, not a cold start on real weights)"
echo "  worker process:        uid $uid (non-root)"
echo "  voice upload:          root-owned /runpod-volume -> voices/hub-test.pth (uid $voice_owner)"
