#!/usr/bin/env bash
# The tests from a fresh clone: set-up (scripts/setup.sh), then the linters and the test suite.
# Extra arguments go to pytest. CI runs exactly this (.ci/run, in its own environment).
#
#   bash scripts/test.sh
#   bash scripts/test.sh -k attach -x
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/setup.sh
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
ruff check alpha_tuner tests examples research benchmarks
mypy
python -m pytest -q "$@"
