#!/usr/bin/env bash
# Install the peer toolkits, each in its own virtual environment outside the repository
# (PEERS_HOME, default ~/.cache/compensator-peers), pinned to the versions of ../shared/PEERS.md,
# on the same CPU torch as ours. CI does not run this; benchmarks/peers/run.py uses it.
set -euo pipefail
# Only the named venvs when given (bash install.sh gptqmodel), else all of them.
ONLY=" ${*:-} "
HOME_DIR=${PEERS_HOME:-$HOME/.cache/compensator-peers}
PY=${PYTHON:-python3}
mkdir -p "$HOME_DIR"

venv() {  # venv NAME PACKAGE...
  [ "$ONLY" = "  " ] || [[ "$ONLY" == *" $1 "* ]] || return 0
  local dir="$HOME_DIR/$1"
  shift
  [ -x "$dir/bin/python" ] || "$PY" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned: the toolkits' own requirements would pull CUDA wheels.
  "$dir/bin/python" -m pip install -q "torch==2.13.0"
  echo "torch==2.13.0" > "$dir/constraints.txt"
  "$dir/bin/python" -m pip install -q -c "$dir/constraints.txt" "$@"
  "$dir/bin/python" -m pip freeze > "$dir/freeze.txt"
  echo "ready: $dir ($*)"
}

venv llm-compressor "llmcompressor==0.14.0.1"
venv gptqmodel "gptqmodel==7.6.0"
venv auto-round "auto-round==0.16.1"
