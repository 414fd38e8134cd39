#!/usr/bin/env bash
# Set-up from a fresh clone: a virtual environment with the pinned CPU torch, alpha_tuner and its
# test tools (editable), and the offline model and data of the demo and the tests.
#
#   source scripts/setup.sh                  # what scripts/quickstart.sh and .ci/run start with
#   VENV=.venv-ci source scripts/setup.sh    # another environment
#   ASSETS=--smollm2 source scripts/setup.sh # also SmolLM2 (options of scripts/setup_assets.sh)
#
# It reads no arguments: when sourced it would see its caller's (the demo's or pytest's).
#
# Idempotent: a second run reuses the environment and skips what is installed. The torch pin is
# the CPU build (2.13.0); for a CUDA build, install torch 2.13 for your CUDA version first, in the
# same environment, following PyTorch's installation selector: pip then keeps it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VENV:-.venv}"
if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# The pinned CPU build first: a bare `torch` requirement would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# shellcheck disable=SC2086  # ASSETS is a list of options
PYTHON=python bash scripts/setup_assets.sh ${ASSETS:-}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
