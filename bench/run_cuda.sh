#!/usr/bin/env bash
# The GPU run behind bench/results/cuda-*.{md,json,png}: one short call on a lent H100/H200.
# From the repository root:  OUT=/some/folder bash bench/run_cuda.sh   (default: bench/results)
# About 5 minutes: the suite at B=64 plus the headline l2-index fwd+bwd at B=256; jobs stop
# starting after 4 minutes and every finished job is saved as it ends.
set -u
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv >"$OUT/nvidia-smi.csv" 2>&1
python3 -c "import torch, triton, tabulate; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
timeout 330 python3 -m bench --device cuda --sizes 64 --sweep l2-index:fwd+bwd:256 --timeout 45 --max-minutes 4 --out "$OUT" 2>&1 | tee "$OUT/stdout.txt"
