#!/usr/bin/env bash
# The fast lane (a few minutes): every test that needs no Ray cluster. Run it after every change; CI and
# scripts/test.sh run everything. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh  # the editable install follows source edits
.venv/bin/ruff check raydiff tests benchmarks scripts
exec .venv/bin/python -m pytest tests -q -m "not integration" "$@"
