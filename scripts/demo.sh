#!/usr/bin/env bash
# Set up (idempotent), then quantize the bundled SmolLM2-135M with RTN and GPTQ at W4 g128
# and print the FP / RTN / GPTQ quality table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if [ -z "${COMPENSATOR_DATA:-}" ] && [ -d ../shared/data ]; then
  export COMPENSATOR_DATA=$(cd ../shared/data && pwd)
fi
compensator --threads "${THREADS:-2}" demo "$@"
