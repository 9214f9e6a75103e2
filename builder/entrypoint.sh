#!/bin/sh
# The image's entry point: runs as root only to hand the worker's account the
# directories it must write on the network volume (RunPod mounts the volume
# root-owned at /runpod-volume), then drops to that account for good, before
# Python starts.
#   WORKER_USER=root       keep running as root (no privileges dropped)
#   docker run --user N    started unprivileged already: nothing to do
set -eu

user=${WORKER_USER:-worker}
if [ "$(id -u)" != 0 ] || [ "$user" = root ]; then
    exec "$@"
fi

say() { echo "chatterbox-entrypoint: $*" >&2; }

if ! uid=$(id -u "$user" 2>/dev/null) || ! gid=$(id -g "$user" 2>/dev/null); then
    say "cannot start: WORKER_USER=$user is not an account in this image"
    exit 1
fi

# Create the directory and make the worker's account its owner. Not recursive
# (a volume may hold many files): owning the directory is what creating,
# replacing and deleting files in it needs. Voice files left by a worker that
# ran as another account are handed over too, so they stay readable.
own_dir() {
    if mkdir -p "$1" 2>/dev/null && chown "$uid:$gid" "$1" 2>/dev/null; then
        find "$1" -maxdepth 1 -type f -name '*.pth' ! -user "$uid" \
            -exec chown "$uid:$gid" {} + 2>/dev/null || true
        return 0
    fi
    say "cannot make $1 writable for $user; $2 (WORKER_USER=root runs the worker as root)"
}

volume=/runpod-volume
voices=${VOICES_DIR:-}
if [ -z "$voices" ] && [ -d "$volume" ]; then
    voices=$volume/voices
fi
if [ -n "$voices" ]; then
    own_dir "$voices" "voice uploads will fail with storage_unavailable"
fi

# Without baked weights of the model it serves (none baked, or another model
# baked than CHATTERBOX_VARIANT asks for), the first worker downloads them into
# the volume's Hugging Face cache for the next ones; only a cache that does not
# exist yet is created (RunPod's cached models are read as they are).
hf_cache=${CHATTERBOX_VOLUME_HF_CACHE:-$volume/huggingface-cache/hub}
baked=${CHATTERBOX_BAKED_DIR:-/opt/chatterbox/weights}
baked_variant=$(cat "$baked/VARIANT" 2>/dev/null || echo original)
serves_baked=no
if [ -f "$baked/REVISION" ] && [ "$baked_variant" = "${CHATTERBOX_VARIANT:-original}" ]; then
    serves_baked=yes
fi
if [ -z "${CHATTERBOX_MODEL_DIR:-}" ] && [ -d "$volume" ] && [ ! -e "$hf_cache" ] \
   && [ "$serves_baked" = no ]; then
    own_dir "$hf_cache" "downloaded weights will not be kept for the next worker"
fi

home=$(getent passwd "$user" | cut -d: -f6)
export HOME="${home:-/}" USER="$user" LOGNAME="$user"
exec setpriv --reuid="$uid" --regid="$gid" --init-groups --no-new-privs -- "$@"
