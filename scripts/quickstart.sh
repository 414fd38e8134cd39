#!/usr/bin/env bash
# The main job from a fresh clone: set-up (scripts/setup.sh), then `alpha-tuner demo` on the
# bundled default (MiniLM, review sentiment, r = 16, lr 2e-5). Extra arguments go to the demo.
#
#   bash scripts/quickstart.sh                 # writes demo_output/demo.{png,json,md}
#   bash scripts/quickstart.sh --out elsewhere --steps 50
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source scripts/setup.sh
alpha-tuner demo "$@"
