"""Every entry point turns a user's mistake into one line on stderr and a non-zero exit code."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, cwd=REPO):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True,
                        env=env, timeout=300)


@pytest.mark.parametrize("args, stderr", [
    (["--config.trian.lr=1"],
     "error: --config.trian.lr: no config field 'trian' (Did you mean \"train\" instead of \"trian\"?)\n"),
    (["--config.train.lrr=1"],
     "error: --config.train.lrr: no config field 'lrr' (Did you mean \"lr\" instead of \"lrr\"?)\n"),
    (["--config.train.lr=abc"],
     "error: flag --config.train.lr=abc: could not convert string to float: 'abc'\n"),
    (["--bogus"], "error: Unknown command line flag 'bogus'\n"),
    (["stray"], "error: unexpected arguments: stray\n"),
])
def test_train_lrm_flag_errors_are_one_line(tmp_path, args, stderr):
  done = _run("vf3d_jax.train_lrm", "--config", "configs/lrm.py:tiny", "--workdir",
              str(tmp_path / "run"), *args)
  assert (done.returncode, done.stderr) == (2, stderr)
  assert not (tmp_path / "run").exists()


def test_missing_config_file_and_unknown_variant(tmp_path):
  done = _run("vf3d_jax.train_lrm", "--config", "configs/nope.py:tiny", "--workdir", str(tmp_path))
  assert (done.returncode, done.stderr) == (
      2, "error: config file configs/nope.py: [Errno 2] No such file or directory: "
      "'configs/nope.py'\n")
  done = _run("vf3d_jax.infer", "--config", "configs/infer.py:nope")
  assert done.returncode == 2
  assert done.stderr.startswith("error: flag --config=configs/infer.py:nope: ")
  assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


@pytest.mark.parametrize("module", ["vf3d_jax.infer", "vf3d_jax.sample_video",
                                    "vf3d_jax.train_video", "tools.render_orbits",
                                    "tools.eval_video", "tools.export_lrm"])
def test_every_entry_point_reports_a_misspelt_override_in_one_line(module):
  done = _run(module, "--config.no_such_field=1")
  assert done.returncode == 2
  assert done.stderr.startswith("error: "), done.stderr
  assert done.stderr.count("\n") == 1, done.stderr
