#!/usr/bin/env bash
# Create .venv and install raydiff with its test extras (pytest, the S3/MLflow test servers, ruff for the lint).
# torch==2.13.0 first: on the project's CPU machines pip takes the CPU build lying on disk; a bare `torch>=2.4`
# would pull a multi-GB CUDA build. GPU users skip this line and let pip pick their CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q "torch==${RAYDIFF_TORCH_VERSION:-2.13.0}"
.venv/bin/pip install -q -e ".[test]"
