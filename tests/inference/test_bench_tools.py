"""The mesh and matting benchmarks run end to end at tiny sizes and report what they say."""

import json
import os
import subprocess
import sys

from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args):
  done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def test_bench_mesh_reports_stages_faces_and_file_sizes():
  out = _run("tools.bench_mesh", "--resolution=48", "--max_faces=800", "--texture_size=64")
  result = json.loads(out.strip().splitlines()[-1])
  faces = result["faces"]
  assert faces["marching_cubes"] >= faces["after_floaters"] > 800 >= faces["after_simplify"] > 700
  assert set(result["seconds"]) == {"density_grid", "marching_cubes", "floaters", "simplify",
                                    "unwrap", "bake"}
  assert all(v > 0 for v in result["seconds"].values())
  files = result["files_mb"]
  assert files["textured_glb_mb"] < files["raw_vertex_colour_obj_mb"]
  assert "simplify + unwrap + bake" in out
  grids = result["coarse_to_fine"]
  assert grids["faces"]["full_grid"] == faces["marching_cubes"]
  assert grids["chamfer_voxels"] <= 0.5 and grids["faces"]["coarse_to_fine"] > 0
  assert grids["queries"]["full_grid"] == 48 ** 3
  assert (grids["queries"]["coarse"] == 7 ** 3
          and grids["queries"]["coarse_to_fine"] < grids["queries"]["full_grid"])
  assert all(v > 0 for v in grids["seconds"].values()) and grids["speedup"] > 0
  assert "grid, every point against coarse to fine (blocks of 8)" in out


def test_bench_matting_scores_methods_and_draws_the_figure(tmp_path):
  figure = tmp_path / "cases.png"
  out = _run("tools.bench_matting", "--cases=5", "--size=96", "--methods=builtin,grabcut",
             f"--figure={figure}")
  result = json.loads(out.strip().splitlines()[-1])
  assert set(result) == {"builtin", "grabcut"}
  for scores in result.values():
    assert 0.0 <= scores["mean_iou"] <= 1.0 and "warned_fraction" in scores
  # One row per background (five cases, one each), columns: input, truth and two mattes.
  assert Image.open(figure).size == (4 * 96, 5 * 96)
