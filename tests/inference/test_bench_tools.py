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


def test_render_and_mesh_benchmarks_on_a_fitted_field(tmp_path):
  field = tmp_path / "fit.safetensors"
  _run("tools.fit_triplane", "--plane_res=16", "--channels=8", "--hidden=16", "--steps=30",
       "--views=6", "--resolution=32", "--held_out_resolution=32", "--density_resolution=32",
       f"--output={field}")
  out = _run("tools.bench_render", f"--fit={field}", "--resolution=32", "--views=0",
             "--dtypes=", "--iters=1", "--chunk_size=256", "--fast=8+8",
             "--occupancy_resolution=16", "--occupancy_subdivision=2", "--compare_camera=records")
  result = json.loads(out[out.index("\n{") + 1:])  # the indented summary closes the output
  assert result["planes"] == [3, 16, 16, 8] and result["field"]["fit"] == str(field)
  comparison = result["fast_vs_compatible"]
  assert comparison["camera"] == "records" and comparison["occupancy"]["probes"] == 128
  compatible = comparison["compatible"]["work_per_view"]
  assert compatible["rays"] == 32 * 32 and compatible["chunks_run"] == compatible["chunks"] == 4
  assert compatible["mlp_evaluations"] == 4 * 256 * 128 == compatible["plane_lookups"] / 3
  (fast,) = comparison["fast"]
  work = fast["work_per_view"]
  assert fast["samples"] == [8, 8] and fast["psnr_db"] > 20 and fast["speedup"] > 0
  assert 0 < work["occupied_fraction"] <= 1 and work["grid_evaluations"] == 33 ** 3
  assert work["active_rays"] <= work["rays_in_box"] <= 32 * 32
  assert work["mlp_evaluations"] == work["chunks_run"] * 256 * 16
  assert "bf16_psnr_db" in fast
  mesh = json.loads(_run("tools.bench_mesh", f"--fit={field}", "--resolution=32",
                         "--max_faces=300", "--texture_size=32").strip().splitlines()[-1])
  assert mesh["planes"] == [3, 16, 16, 8] and mesh["checkpoint"] is None
  queries = mesh["coarse_to_fine"]["queries"]
  assert queries["plane_lookups"]["full_grid"] == 3 * 32 ** 3
