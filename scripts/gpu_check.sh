#!/usr/bin/env bash
# One short GPU session: the CUDA accuracy tests, then the GPU benchmark table.
# Usage (on a CUDA machine, inside the repo, environment from scripts/setup.sh with a CUDA torch):
#   bash scripts/gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/gpu}
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
"$py" -m pytest -q tests/test_speed_options.py 2>&1 | tee "$out/tests.txt"
"$py" scripts/benchmark.py --device cuda --sizes 256 512 1024 --variants all --batch 1 --repeats 5 \
    --train-size 256 --scene 4096 --tile 512 --overlap 64 --tile-batch 4 --out "$out" 2>&1 | tee "$out/benchmark.log"
