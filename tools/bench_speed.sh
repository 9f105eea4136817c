#!/usr/bin/env bash
# The fast paths against today's, side by side in one run at real sizes (planes 3 x 64 x 64 x 80,
# the released decoder) on a fitted field, and on the demo model; docs/benchmarks/speed.md holds
# the figures of 2 CPU cores.
#
#   tools/bench_speed.sh                    # fits the field first if it is not there (~2-4 min)
#
# Runs: the fast render mode (64 lattice > 16 or 12 decoded samples, the fast variant's
# proposal pass; 16+16 and 12+12 decoder samples) against compatible (64+64) on one
# 384^2 view of the fitted field from the released turntable's camera and from the orbit
# records', with PSNR, times and work counts; the same at 128^2 on the demo LRM's field; the
# 512^3 mesh grid coarse to fine against every grid point on the fitted field. Writes
# $OUT/render_fit_{turntable,records}.json, render_demo.json and mesh_fit.json (default
# OUT=runs/bench_speed),
# each the benchmark's final JSON, and the full outputs beside them.
#
# Environment: FIT (the field, default data/fits/procedural-0-0.safetensors), OUT, PY (python;
# default .venv/bin/python where it exists, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
FIT=${FIT:-data/fits/procedural-0-0.safetensors}
OUT=${OUT:-runs/bench_speed}
mkdir -p "$OUT"
[ -f "$FIT" ] || "$PY" -m tools.fit_triplane --output "$FIT"

# The last JSON object of a benchmark's output (its summary; tools.bench_all.last_json), into a
# file of its own.
last_json() {
  "$PY" -c 'import json, sys
from tools.bench_all import last_json
json.dump(last_json(open(sys.argv[1]).read()), open(sys.argv[2], "w"), indent=1)' "$1" "$2"
}

for camera in turntable records; do
  "$PY" -m tools.bench_render --fit "$FIT" --views 0 --dtypes= --iters 2 --chunk_size 4096 \
    --fast 64\>16,64\>12,16+16,12+12 --compare_camera $camera 2>&1 | tee "$OUT/render_fit_$camera.txt"
  last_json "$OUT/render_fit_$camera.txt" "$OUT/render_fit_$camera.json"
done
"$PY" -m tools.bench_render --checkpoint examples/lrm_tiny.safetensors --resolution 128 --views 0 \
  --dtypes= --iters 3 --chunk_size 4096 --fast 64\>16,64\>12,16+16 2>&1 | tee "$OUT/render_demo.txt"
last_json "$OUT/render_demo.txt" "$OUT/render_demo.json"
"$PY" -m tools.bench_mesh --fit "$FIT" 2>&1 | tee "$OUT/mesh_fit.txt"
last_json "$OUT/mesh_fit.txt" "$OUT/mesh_fit.json"
echo "wrote $OUT/render_fit_turntable.json $OUT/render_fit_records.json $OUT/render_demo.json" \
  "$OUT/mesh_fit.json"
