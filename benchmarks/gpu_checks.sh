#!/usr/bin/env bash
# The checks that need a GPU, as one script (run on a CUDA machine from the repository root):
# the CUDA tests (no-sync, the step law on a device), bench_step.py's step overhead on the 7B set
# at the default cadence for the three inner AdamW variants, repeated as separate runs (the
# median over runs is the figure), then one run of every cadence with memory and Gram figures.
#
#   OUT=/some/dir bash benchmarks/gpu_checks.sh
#
# Writes nosync_cuda.log, bench_default_<k>.json and bench_step_cuda.{json,log} under $OUT.
set -uo pipefail
OUT="${OUT:-benchmarks/results/gpu}"
RUNS="${RUNS:-3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=. HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY="${PYTHON:-python3}"
nvidia-smi -L
"$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, torch.cuda.get_device_name(0))'
timeout 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_nosync.py tests/test_steplaw.py -m cuda -rA 2>&1 | tee "$OUT/nosync_cuda.log"
# A run at --cycles 6 over three inner variants takes about 20 s on an H200 (one process each).
for k in $(seq 1 "$RUNS"); do
    timeout 90 "$PY" benchmarks/bench_step.py --device cuda --inner fused foreach for-loop --cadence default \
        --cycles 6 --json "$OUT/bench_default_$k.json" 2>&1 | grep -v '^USDT' | tail -12
done
timeout 150 "$PY" benchmarks/bench_step.py --device cuda --inner fused foreach for-loop --cycles 2 --every-steps 8 \
    --json "$OUT/bench_step_cuda.json" 2>&1 | grep -v '^USDT' | tee "$OUT/bench_step_cuda.log"
# Optional control: the same default-cadence run with an earlier library in $OLD (a folder that
# holds an alpha_tuner package), in the same lease.
if [ -n "${OLD:-}" ]; then
    PYTHONPATH="$OLD:." timeout 90 "$PY" benchmarks/bench_step.py --device cuda --inner fused foreach for-loop \
        --cadence default --cycles 6 --json "$OUT/bench_default_old.json" 2>&1 | grep -v '^USDT' | tail -12
fi
