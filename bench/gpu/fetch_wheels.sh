#!/usr/bin/env bash
# Download, here, the wheels bench/gpu/run.sh installs on the GPU machine (Python 3.12, x86_64).
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf wheels && mkdir -p wheels  # nothing stale travels: the carried tree is capped at 64 MiB
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any -r bench/gpu/wheels.txt -d wheels 2>&1 | grep -v "is ignored" || true
du -sh wheels
