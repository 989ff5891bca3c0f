#!/usr/bin/env bash
# Set up (idempotent), lint (seconds; a lint error fails the run before any test starts), run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check raydiff tests benchmarks scripts
exec .venv/bin/python -m pytest tests -q "$@"
