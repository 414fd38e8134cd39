#!/usr/bin/env bash
# The tests from a fresh clone: set-up, linters and `python -m pytest -q`, exactly as CI runs them
# (.ci/run), in the user's environment .venv/. Extra arguments go to pytest.
#
#   bash scripts/test.sh
#   bash scripts/test.sh -k attach -x
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}" exec bash .ci/run "$@"
