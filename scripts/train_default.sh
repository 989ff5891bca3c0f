#!/usr/bin/env bash
# Set up (idempotent) and run the main job on its embedded default: local Ray, tiny SDXL, generated data, CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m raydiff.train "$@"
