#!/usr/bin/env bash
# benchmarks/gpu.py on a machine without network whose Python already has torch with CUDA (this
# workplace's lent GPU machines), from the repository's root:
#
#   make gpu-wheels                               # here: the missing packages, as wheels, into .whl/
#   bash benchmarks/gpu_device.sh [gpu.py options]   # there, with .whl/ carried along
#
# It installs the wheels in .whl/ (if any) into /tmp/site, puts the repository on the path (no
# `pip install -e` needed) and runs the benchmark with its tables, its log and the GPU's state under
# $OUT (default gpu_out/), each part's table written as soon as the part ends.
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv \
    > "$out/nvidia-smi.csv" 2>&1 || true
df -h /tmp /dev/shm >> "$out/nvidia-smi.csv" 2>&1 || true
# gpu.py skips the parts it cannot start within its --budget-s (500 s by default); this stops it
# outright where a part overran, before the device's own per-command limit (each part's table is
# already written).
timeout --signal=INT --kill-after=10 "${GPU_BENCH_LIMIT_S:-575}" \
    python3 benchmarks/gpu.py --out "$out/gpu.md" --work /tmp/dist_lc_gpu_bench "$@" 2>&1 | tee "$out/gpu.log"
