#!/usr/bin/env bash
# Every benchmark at real sizes in one call, one JSON (tools/bench_all.py says what runs and how long
# each may take): LRM planes fp32/bf16, one view + turntable, mesh, the training step at 4 and 16
# objects and its compiled memory, the video model. Under 8 minutes on one GPU.
#
#   OUT=/some/dir tools/bench_all.sh        # writes $OUT/bench_all.json (else runs/bench_all.json)
#   SMOKE=1 tools/bench_all.sh              # every benchmark at tiny CPU sizes (about 2 minutes)
#   tools/bench_all.sh --only train,video   # extra arguments go to tools.bench_all
#
# Environment: OUT (output folder), SMOKE (1: tiny sizes), PY (python; default .venv/bin/python
# where it exists, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
args=()
if [ "${SMOKE:-0}" != 0 ] && [ -n "${SMOKE:-}" ]; then args+=(--smoke); fi
exec "$PY" -m tools.bench_all ${args[@]+"${args[@]}"} "$@"
