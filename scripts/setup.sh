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
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
  || .venv/bin/python -m pip install -q --no-deps -e .
echo "environment ready: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
