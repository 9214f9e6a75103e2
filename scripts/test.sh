#!/usr/bin/env bash
# One command to run every test (unit, engine, end-to-end) in the .venv made by scripts/setup.sh.
#   bash scripts/test.sh [pytest args]
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
.venv/bin/python -m pytest "$@"
status=$?
# pytest exits 5 when it collected no tests: that is a broken suite, say so.
if [ "$status" -eq 5 ]; then
  echo "test.sh: pytest collected no tests" >&2
fi
exit "$status"
