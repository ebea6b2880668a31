#!/usr/bin/env bash
# The prepared GPU check, for a session that is lent a device: the CUDA benchmark, then the ladder on real scans at
# 224 px with the backbone in bfloat16. Sized for a 15-minute lease: about 2 minutes of bench_cuda.py, then
# MINUTES (default 9) of ladder, the store, the pre-training and every rung included.
#
# usage: bash benchmarks/gpu_real.sh DATA_ROOT OUT [MINUTES]
#   DATA_ROOT: a CEDAR-layout folder (only read); OUT: where the runs, ladder.json and the two tables go.
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: bash benchmarks/gpu_real.sh DATA_ROOT OUT [MINUTES]" >&2
    exit 2
fi
data_root=$1 out=$2 minutes=${3:-9}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python benchmarks/bench_cuda.py --device cuda --writers 12 | tee "$out/bench_cuda.md"
python benchmarks/bench_real.py "$data_root" --minutes "$minutes" --out "$out/ladder" --image-size 224 \
    --amp-dtype bfloat16 --device cuda | tee "$out/ladder.md"
