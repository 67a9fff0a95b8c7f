#!/usr/bin/env bash
# One short GPU session: the CUDA tests, then the GPU benchmark tables (about 6 minutes on
# an H100/H200). torch.compile is left out: compiling the sampler took over 2 minutes on the
# H200. Each part has its own time limit (TEST_LIMIT, BENCH_LIMIT), so a hang cannot eat the session.
# Usage (on a CUDA machine, inside the repo, environment from scripts/setup.sh with a CUDA torch):
#   bash scripts/gpu_check.sh [OUT_DIR]          # PYTHON=python3 to use another interpreter
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/gpu}
mkdir -p "$out"
py=${PYTHON:-.venv/bin/python}
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
status=0
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
} 2>&1 | tee "$out/gpu.txt"
timeout "${TEST_LIMIT:-260}" "$py" -m pytest -q tests/test_cuda.py tests/test_speed_options.py 2>&1 | tee "$out/tests.txt" \
    || status=1
timeout "${BENCH_LIMIT:-300}" "$py" scripts/benchmark.py --device cuda --sizes 256 512 1024 --straightforward-max 512 \
    --variants fp32 tf32 bf16-stage1 bf16 bf16+cl --variant-sizes 512 --batch 1 \
    --warmup 2 --repeats 5 --train-size 256 --scene 4096 --tile 512 --overlap 64 --tile-batch 4 \
    --scene-variant bf16+cl --out "$out" 2>&1 | tee "$out/benchmark.log" || status=1
exit $status
