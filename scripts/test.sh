#!/usr/bin/env bash
# Set up (idempotent) and run every test, the slow real-model ones included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export COMPENSATOR_DATA=${COMPENSATOR_DATA:-$(cd .. && pwd)/shared/data}
# Every test runs here: one whose model or data is missing fails instead of skipping.
export COMPENSATOR_REQUIRE_ALL=1
ruff check src tests benchmarks
ruff format --check src tests benchmarks
# The slowest tests, so that CI time stays visible (budget: 45 min).
python -m pytest -q --durations=15 "$@"
