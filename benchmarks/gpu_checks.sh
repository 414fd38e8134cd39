#!/usr/bin/env bash
# The checks that need a GPU, as one script (run on a CUDA machine from the repository root):
# the CUDA tests (no-sync, the step law on a device) and bench_step.py's step overhead on the 7B set
# (the default law).
#
#   OUT=/some/dir bash benchmarks/gpu_checks.sh
#
# Writes nosync_cuda.log, bench_step_cuda.log and bench_step_cuda.json under $OUT.
set -uo pipefail
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=. HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY="${PYTHON:-python3}"
nvidia-smi -L
"$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, torch.cuda.get_device_name(0))'
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_nosync.py tests/test_steplaw.py -m cuda -rA 2>&1 | tee "$OUT/nosync_cuda.log"
# Sized for a 15-minute device lease: at --cycles 8 --every-steps 40 with three inner variants a
# run took over 110 s on an H200; this one took 34 s.
timeout 110 "$PY" benchmarks/bench_step.py --device cuda --inner fused foreach --cycles 2 --every-steps 8 \
    --json "$OUT/bench_step_cuda.json" 2>&1 | grep -v '^USDT' | tee "$OUT/bench_step_cuda.log"
