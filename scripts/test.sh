#!/usr/bin/env bash
# Set up (idempotent), lint (seconds; a lint error fails the run before any test starts), then the whole suite as its
# two lanes at once: the integration lane (real Ray clusters) in the foreground, and beside it, at a lower CPU
# priority, the fast lane (no Ray: it can share the machine with a cluster), which fills the cores the integration
# tests leave idle while their clusters and workers start. The fast lane's output follows; the run fails if either
# lane fails. Extra arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check raydiff tests benchmarks scripts
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Its own temp root and no shared .pytest_cache: two pytest sessions at once.
nice -n 10 .venv/bin/python -m pytest tests -q -m "not integration" -p no:cacheprovider --basetemp="$work/tmp" "$@" \
  > "$work/fast.log" 2>&1 &
fast_pid=$!
set +e
.venv/bin/python -m pytest tests -q -m integration "$@"
integration_rc=$?
wait "$fast_pid"
fast_rc=$?
set -e
echo "---------------- fast lane (no Ray; ran beside the integration lane) ----------------"
cat "$work/fast.log"
echo "integration lane: exit $integration_rc; fast lane: exit $fast_rc"
[ "$integration_rc" -eq 0 ] && [ "$fast_rc" -eq 0 ]
