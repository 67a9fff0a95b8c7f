#!/usr/bin/env bash
# Create ./.venv (once) and install dsrdmpd with its dependencies into it.
# TORCH_SPEC chooses the torch build when torch is not installed yet (default torch==2.13.0;
# on a CUDA machine e.g. TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124").
# CONSTRAINTS (a path in the repository; default constraints.txt: the versions the suite passes with) pins every package
# but torch and what torch itself brings (a CUDA index pins those its own way);
# CONSTRAINTS= (empty) takes the newest that requirements.txt allows.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CONSTRAINTS=${CONSTRAINTS-constraints.txt}
PIN=()
[ -z "$CONSTRAINTS" ] || PIN=(-c "$CONSTRAINTS")
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
fi
.venv/bin/python -m pip install -q ${PIN[@]+"${PIN[@]}"} -r requirements.txt -r requirements-dev.txt
# Triton, for the tests of the GPU kernels: its CPU interpreter runs them and its compiler builds
# them for sm_90, no GPU needed. Where no Triton is importable yet (a CUDA, ROCm or XPU torch
# brings its own) and the machine is Linux x86-64, TRITON_SPEC is installed (default
# triton==3.6.0, the version on the project's GPU machine); TRITON_SPEC= (empty) leaves it out
# (those tests then skip).
TRITON_SPEC=${TRITON_SPEC-triton==3.6.0}
if [ -n "$TRITON_SPEC" ] && .venv/bin/python -c "import importlib.util, platform, sys
sys.exit(0 if importlib.util.find_spec('triton') is None and sys.platform == 'linux'
         and platform.machine() == 'x86_64' else 1)"; then
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q $TRITON_SPEC
fi
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || .venv/bin/python -m pip install -q --no-deps -e .
echo "environment ready: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
