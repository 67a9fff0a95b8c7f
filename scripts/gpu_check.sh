#!/usr/bin/env bash
# One short GPU session (under 7 minutes on an H100/H200): the CUDA tests of the fast paths,
# the GPU benchmark tables (size x batch x precision with the fast GroupNorm and CUDA graphs,
# training steps/s), the older CUDA tests, and, if time is left, the ahead-of-time compiled
# pipeline (build, then load in a fresh process) and torch.compile cold/warm.
# Every part has its own time limit and writes its raw output to OUT_DIR as it goes, so a
# hang or a slow part cannot eat the session; BUDGET (seconds, default 400) bounds the whole, so
# that a lent GPU's 15 minutes (start-up included) leave room to run it a second time.
# OUT_DIR gets check.txt (machine, test output, total time), bench.log (benchmark progress) and
# benchmark.md + benchmark.csv in inference/, breakdown/, scene/, training/ and, if time was left,
# aot/, inference_more/ and compile/.
# tests/test_speed_options.py's GPU cases (measured on the H200 before) are not rerun here.
#
# Usage (on a CUDA machine, in the repo root):
#   bash scripts/gpu_check.sh [OUT_DIR]        # PYTHON=python3 for another interpreter
# A second, shorter slice can rerun some parts: PARTS (default all: "1 2 2b 2s 2t 3 4t 4a 4g 4c")
# names them; FAST_TESTS (a pytest -k expression), PAIRS / PAIR_VARIANTS (part 2),
# GRID_PAIRS / GRID_VARIANTS (4g), SCENE_VARIANT / SCENE_TILE_BATCH (2s) and AOT_LIMIT / AOT_CASE
# (4a, seconds) narrow or widen them:
#   PARTS="1 2 4a" FAST_TESTS="graphed_training or fused_adam" PAIRS="512x1" BUDGET=300 bash scripts/gpu_check.sh
# The profiled rows of part 2 also give, in benchmark.csv, the GPU time per image
# (gpu_busy_ms_per_image) and the kernels with the most GPU time (top_kernels); part 2b the
# GPU time by module class (benchmark.py --breakdown; BREAKDOWN_PAIRS, BREAKDOWN_VARIANTS).
# Packages the machine lacks (ema-pytorch, pypng) travel as wheels in .whl/ (git-ignored),
# fetched beforehand on a machine with pip:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl ema-pytorch pypng
# they are installed to /tmp/site here when .whl/ holds any.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/gpu}
mkdir -p "$out"
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
# the tests' CPU-side parts (CPU reference runs, the stage-1 fixture run) use 8 of the card
# machine's cores instead of the 2 of the development machine (tests/conftest.py)
export DSRDMPD_TEST_THREADS=${DSRDMPD_TEST_THREADS:-8}
budget=${BUDGET:-400}
status=0
parts=" ${PARTS:-1 2 2b 2s 2t 3 4t 4a 4g 4c} "
want() { [[ $parts == *" $1 "* ]]; }
left() { echo $(( budget - SECONDS )); }
limit() { local want=$1 l; l=$(left); (( l < want )) && want=$l; (( want < 10 )) && want=10; echo "$want"; }
# a part past its limit gets SIGINT first: pytest then still prints the failures and durations it
# has (SIGTERM would lose them), the benchmark keeps its finished rows; SIGKILL 10 s later
stop() { timeout -s INT -k 10 "$@"; }
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
    "$py" -c "import triton; print('triton', triton.__version__)" || echo "triton: not importable"
    date -u +"date %Y-%m-%dT%H:%M:%SZ"
} 2>&1 | tee "$out/check.txt"

# 1. the fast paths against the float32 reference (norm, graphs; Triton kernels in the interpreter too)
if want 1; then
    stop "$(limit "${FAST_TEST_LIMIT:-70}")" "$py" -m pytest -q -rs --durations=15 tests/test_cuda_fast.py \
        tests/test_fast_path.py::test_triton_kernels_in_the_interpreter \
        -k "${FAST_TESTS:-not compile_cache and not aot}" 2>&1 | tee -a "$out/check.txt" || status=1
fi

# 2. inference: the issue's target cases first (256 x 1, 512 x 1, 256 x 32; true float32, TF32 and
#    bf16, each plain and with the fast options; one process per size and batch), then (2s) the
#    4096 x 4096 scene in 512 tiles and (2t) the training steps/s
if want 2; then
    stop "$(limit "${BENCH_LIMIT:-110}")" "$py" scripts/benchmark.py --device cuda --sizes --train-size 0 \
        --pairs ${PAIRS:-256x1 512x1 256x32} --variants ${PAIR_VARIANTS:-fp32 fp32+fastnorm+graphs tf32 \
        tf32+fastnorm+graphs tf32+cl+fastnorm+graphs bf16+cl+fastnorm+graphs} --warmup 1 --repeats 3 \
        --case-timeout 60 --out "$out/inference" 2>&1 | tee -a "$out/bench.log" || status=1
fi
# 2b. where the time goes: GPU time by module class, one eager call (no graphs) at 256 and 512 x 1
if want 2b; then
    stop "$(limit "${BREAKDOWN_LIMIT:-40}")" "$py" scripts/benchmark.py --device cuda --sizes --variants --train-size 0 \
        --pairs ${BREAKDOWN_PAIRS:-256x1 512x1} --breakdown ${BREAKDOWN_VARIANTS:-tf32+fastnorm tf32+cl+fastnorm} \
        --warmup 1 --case-timeout 35 --out "$out/breakdown" 2>&1 | tee -a "$out/bench.log" || status=1
fi
if want 2s; then
    stop "$(limit "${SCENE_LIMIT:-40}")" "$py" scripts/benchmark.py --device cuda --sizes --variants --train-size 0 \
        --scene 4096 --tile 512 --overlap 64 --tile-batch "${SCENE_TILE_BATCH:-4}" \
        --scene-variant "${SCENE_VARIANT:-tf32+cl+fastnorm+graphs}" --warmup 1 \
        --case-timeout 35 --out "$out/scene" 2>&1 | tee -a "$out/bench.log" || status=1
fi
if want 2t; then
    stop "$(limit "${TRAIN_LIMIT:-75}")" "$py" scripts/benchmark.py --device cuda --sizes --variants \
        --train-size 256 --warmup 2 --repeats 5 --case-timeout 30 --out "$out/training" 2>&1 \
        | tee -a "$out/bench.log" || status=1
fi

# 3. the CUDA tests of training (graph-captured step, exact resume with the step options) and the command line
if want 3; then
    stop "$(limit "${TEST_LIMIT:-110}")" "$py" -m pytest -q -rs --durations=15 tests/test_cuda.py 2>&1 \
        | tee -a "$out/check.txt" || status=1
fi

# 4. if time is left: (4t) the compile-cache and AOT-package tests; (4a) the AOT package at
#    paper width (build, then load in a fresh process); (4g) the rest of the grid (256 x 8,
#    1024 x 1); (4c) torch.compile with the persistent cache (DSRDMPD_COMPILE_CACHE): the first
#    call with an empty and with a filled cache at paper width
if want 4t && (( $(left) >= ${COMPILE_MIN:-60} )); then
    stop "$(limit 200)" "$py" -m pytest -q -s tests/test_cuda_fast.py -k "compile_cache or aot" 2>&1 \
        | tee -a "$out/check.txt" || status=1
fi
if want 4a && (( $(left) >= ${AOT_MIN:-100} )); then
    stop "$(limit "${AOT_LIMIT:-$(( $(left) / 2 ))}")" "$py" scripts/benchmark.py --device cuda --sizes --variants \
        --train-size 0 --aot-sizes 256 --aot-variant tf32 --repeats 3 --case-timeout "${AOT_CASE:-$(( $(left) / 3 ))}" \
        --out "$out/aot" 2>&1 | tee -a "$out/bench.log" || status=1
elif want 4a; then
    echo "aot: skipped, $(left) s left of $budget" | tee -a "$out/bench.log"
fi
if want 4g && (( $(left) >= ${GRID_MIN:-60} )); then
    stop "$(limit "${GRID_LIMIT:-90}")" "$py" scripts/benchmark.py --device cuda --sizes --train-size 0 \
        --pairs ${GRID_PAIRS:-256x8 1024x1} --variants ${GRID_VARIANTS:-fp32 tf32 tf32+fastnorm+graphs \
        tf32+cl+fastnorm+graphs bf16+cl+fastnorm+graphs} --warmup 1 --repeats 3 --case-timeout "${GRID_LIMIT:-90}" \
        --out "$out/inference_more" 2>&1 | tee -a "$out/bench.log" || status=1
fi
if want 4c && (( $(left) >= ${COMPILE_MIN:-100} )); then
    stop "$(limit "$(left)")" "$py" scripts/benchmark.py --device cuda --sizes --variants --train-size 0 \
        --compile-sizes 256 --repeats 3 --case-timeout $(( $(left) / 2 )) --out "$out/compile" 2>&1 \
        | tee -a "$out/bench.log" || status=1
elif want 4c; then
    echo "compile: skipped, $(left) s left of $budget" | tee -a "$out/bench.log"
fi
echo "total ${SECONDS} s" | tee -a "$out/check.txt"
exit $status
