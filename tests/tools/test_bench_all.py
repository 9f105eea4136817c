"""tools/bench_all.sh: every benchmark in one run, one JSON; the smoke mode at tiny CPU sizes."""

import json
import os
import subprocess
import time

import pytest

from tools import bench_all

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_last_json_takes_the_last_top_level_object():
  one_line = 'log line\n{"a": 1}\nmore text\n{"b": {"c": [1, 2]}}\n'
  assert bench_all.last_json(one_line) == {"b": {"c": [1, 2]}}
  indented = ('{"row": 1}\n' + json.dumps({"x": 1, "results": [{"row": 1}]}, indent=1)
              + "\n")
  assert bench_all.last_json(indented) == {"x": 1, "results": [{"row": 1}]}
  # A line after the object that is not JSON, and one that starts with a brace but is not.
  assert bench_all.last_json('{"k": 2}\n{not json\ndone\n') == {"k": 2}
  assert bench_all.last_json("no json here\n[1, 2]\n") is None
  assert bench_all.last_json("") is None


def test_a_failing_or_overrunning_benchmark_is_recorded(tmp_path):
  failed = bench_all.run_one("tools.no_such_benchmark", [], 60, str(tmp_path / "failed.log"))
  assert failed["rc"] == 1 and not failed["timed_out"] and failed["result"] is None
  assert "No module named tools.no_such_benchmark" in failed["tail"]
  start = time.perf_counter()
  slow = bench_all.run_one("timeit", ["-n", "1", "-r", "1", "import time; time.sleep(60)"], 2,
                           str(tmp_path / "slow.log"))
  assert time.perf_counter() - start < 30
  assert slow["timed_out"] and slow["rc"] is None and slow["result"] is None
  assert slow["tail"].endswith("timed out after 2 s")
  assert (tmp_path / "slow.log").read_text().startswith("$ ")


@pytest.mark.slow  # about 2 minutes on 2 shared CPU cores (the tiny video model's compiles: 50 s)
def test_smoke_run_gives_every_benchmark_a_result(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", SMOKE="1", OUT=str(tmp_path),
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  done = subprocess.run([os.path.join(REPO, "tools", "bench_all.sh")], cwd=tmp_path,
                        capture_output=True, text=True, timeout=900, env=env)
  report = json.loads((tmp_path / "bench_all.json").read_text())
  assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
  assert report["smoke"] is True and report["device"] and report["started"]
  benchmarks = report["benchmarks"]
  assert list(benchmarks) == list(bench_all.NAMES)
  for name, entry in benchmarks.items():
    assert entry["rc"] == 0 and not entry["timed_out"], (name, entry["tail"])
    assert isinstance(entry["result"], dict) and entry["tail"] is None, name
    assert (tmp_path / "bench_all_logs" / f"{name}.log").exists()
  assert [r["batch"] for r in benchmarks["train"]["result"]["results"]] == [2]
  assert benchmarks["train_memory"]["result"]["mode"] == "memory_only"
  assert benchmarks["train_memory"]["result"]["results"][0]["remat"]["temp_gib"] > 0
  assert {r["dtype"] for r in benchmarks["render"]["result"]["results"]} == {"float32", "bfloat16"}
  assert benchmarks["lrm"]["result"]["bf16_batch"] == 2
  assert benchmarks["mesh"]["result"]["resolution"] == 48
  assert benchmarks["video"]["result"]["variant"] == "tiny"
