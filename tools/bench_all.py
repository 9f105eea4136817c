r"""Every benchmark at real sizes in one call, one JSON (``tools/bench_all.sh`` runs this).

  OUT=/tmp/out tools/bench_all.sh            # one GPU, within 8 minutes: $OUT/bench_all.json
  python -m tools.bench_all                   # the same; runs/bench_all.json without $OUT
  SMOKE=1 tools/bench_all.sh                  # every benchmark at tiny CPU sizes, about 2 minutes
  python -m tools.bench_all --only train,train_memory   # some of them

Runs, in order, each in its own process under its own time budget (``timeout``;
the process group is killed when it runs out, and the budgets are cut to what
is left of ``--budget_s`` for the whole run):

  * ``lrm``: image -> planes, fp32 batch-1 latency and bf16 batch-8 throughput
    (``tools.bench_lrm``);
  * ``render``: one 384^2 view and the 160-view turntable, fp32 and bf16
    (``tools.bench_render``);
  * ``mesh``: the demo LRM's 512^3 grid, clean-up, unwrap and bake
    (``tools.bench_mesh``);
  * ``train``: the full-size LRM training step at 4 and 16 objects
    (``tools.bench_train --batches 4,16``);
  * ``train_memory``: XLA's compiled memory of that step at 16 objects, with
    and without rematerialisation (``tools.bench_train --memory_only``);
  * ``video``: the video UNet's adapter training step and guided sampling
    (``tools.bench_video``).

Each benchmark prints its result as a JSON object last (indented or on one
line); that object is kept. The combined file is
``{"device", "started", "smoke", "budget_s", "seconds", "benchmarks": {name:
{"command", "rc", "seconds", "timed_out", "result", "tail"}}}``: ``rc`` is the
exit code (None when timed out or skipped), ``result`` the parsed object or
None, ``tail`` the last lines of the output when it failed or printed no
result (None otherwise). A failing benchmark does not stop the others (the
run exits 1 at the end when any failed). The JSON is rewritten after each
benchmark, and the full output of each lies beside it in ``bench_all_logs/``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import flags

from vf3d_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name, module, real-size arguments, budget s, smoke (tiny CPU) arguments, smoke budget s.
# Real budgets sum to 450 s and the run stops starting benchmarks at --budget_s (470 s), so the
# whole run stays within 8 minutes on one GPU. They are estimates, not yet checked on a GPU.
BENCHMARKS = (
    ("lrm", "tools.bench_lrm", ["--iters", "10"], 45,
     ["--variant", "tiny", "--batch", "2", "--iters", "2"], 60),
    ("render", "tools.bench_render", ["--iters", "3"], 60,
     ["--resolution", "32", "--views", "4", "--plane_size", "16", "--channels", "8",
      "--hidden", "16", "--chunk_size", "1024", "--num_coarse", "8", "--num_fine", "8",
      "--iters", "2"], 60),
    ("mesh", "tools.bench_mesh", [], 60,
     ["--resolution", "48", "--max_faces", "800", "--texture_size", "64"], 60),
    ("train", "tools.bench_train", ["--batches", "4,16", "--iters", "3"], 130,
     ["--variant", "tiny", "--batches", "2", "--views", "2", "--resolution", "32", "--crop", "16",
      "--samples", "4,4", "--iters", "1", "--loss", "mse"], 90),
    ("train_memory", "tools.bench_train", ["--memory_only", "--batches", "16"], 75,
     ["--memory_only", "--variant", "tiny", "--batches", "2", "--views", "2", "--resolution", "32",
      "--crop", "16", "--samples", "4,4", "--loss", "mse"], 90),
    ("video", "tools.bench_video", ["--iters", "3"], 80,
     ["--variant", "tiny", "--batch", "1", "--frames", "4", "--steps", "2", "--iters", "1",
      "--dtype", "float32", "--remat=false"], 90),
)
NAMES = tuple(b[0] for b in BENCHMARKS)
TAIL_LINES = 40
# Below this many seconds left of the total budget a benchmark is skipped, not started.
MIN_START_S = 10
SMOKE_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")

_SMOKE = _OUTPUT = _ONLY = _BUDGET = None  # flags, defined only when this runs as a program


def _define_flags() -> None:
  """The command line's flags (not at import: importing tools side by side must not clash)."""
  global _SMOKE, _OUTPUT, _ONLY, _BUDGET  # pylint: disable=global-statement
  _SMOKE = flags.DEFINE_bool("smoke", os.environ.get("SMOKE", "0") not in ("", "0"),
                             "Tiny CPU sizes (default from $SMOKE).")
  _OUTPUT = flags.DEFINE_string("output", "",
                                "Combined JSON (default $OUT/bench_all.json, else "
                                "runs/bench_all.json).")
  _ONLY = flags.DEFINE_list("only", [], f"Benchmarks to run (default all): {', '.join(NAMES)}.")
  _BUDGET = flags.DEFINE_integer("budget_s", 470, "Seconds for the whole run; each benchmark's "
                                 "budget is cut to what is left.")


def last_json(text: str) -> dict | None:
  """The last JSON object in ``text`` that starts at the beginning of a line (None if none).

  Top-level objects start at column 0 whether printed on one line or indented
  (their nested objects are indented), so the last column-0 ``{`` that decodes
  is the start of the last object.
  """
  decoder = json.JSONDecoder()
  starts, offset = [], 0
  for line in text.splitlines(keepends=True):
    if line.startswith("{"):
      starts.append(offset)
    offset += len(line)
  for start in reversed(starts):
    try:
      value, _ = decoder.raw_decode(text, start)
    except json.JSONDecodeError:
      continue
    if isinstance(value, dict):
      return value
  return None


def device_name() -> str:
  """The GPU's name from ``nvidia-smi`` (without starting JAX), else the CPU's."""
  if shutil.which("nvidia-smi"):
    try:
      names = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30, check=True).stdout.strip().splitlines()
      if names:
        return f"{len(names)} x {names[0].strip()}"
    except (subprocess.SubprocessError, OSError):
      pass
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      model = next((line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name")), model)
  except OSError:
    pass
  return f"cpu: {model}, {os.cpu_count()} cores"


def smoke_env(cache_dir: str) -> dict[str, str]:
  """The benchmarks' environment in the smoke mode: compile cheaply, and each program once.

  The numbers of a smoke run only show that every benchmark runs and reports,
  so XLA's CPU backend skips its expensive LLVM passes, and a persistent
  compilation cache (``$JAX_COMPILATION_CACHE_DIR`` where set, else
  ``cache_dir``) lets ``train_memory`` reuse the step ``train`` compiled.
  """
  env = dict(os.environ)
  xla = env.get("XLA_FLAGS", "")
  for flag in SMOKE_XLA_FLAGS:
    if flag.split("=")[0] not in xla:
      xla = f"{xla} {flag}".strip()
  env["XLA_FLAGS"] = xla
  env.setdefault("JAX_COMPILATION_CACHE_DIR", cache_dir)
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  return env


def run_one(module: str, args: list[str], timeout: float, log_path: str,
            env: dict[str, str] | None = None) -> dict:
  """Runs ``python -m module args`` in its own process group for at most ``timeout`` seconds."""
  command = [sys.executable, "-m", module, *args]
  start = time.perf_counter()
  proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True, env=env)
  timed_out = False
  try:
    stdout, stderr = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    timed_out = True
    os.killpg(proc.pid, signal.SIGKILL)
    stdout, stderr = proc.communicate()
  seconds = time.perf_counter() - start
  with open(log_path, "w", encoding="utf-8") as f:
    f.write(f"$ {' '.join(command)}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
  result = last_json(stdout)
  rc = None if timed_out else proc.returncode
  failed = timed_out or rc != 0 or result is None
  tail = None
  if failed:
    lines = (stdout + stderr).splitlines()[-TAIL_LINES:]
    if timed_out:
      lines.append(f"timed out after {timeout:.0f} s")
    tail = "\n".join(lines)
  return {"command": " ".join(["python", "-m", module, *args]), "rc": rc,
          "seconds": round(seconds, 1), "timed_out": timed_out, "budget_s": round(timeout),
          "result": result, "tail": tail}


def output_path() -> str:
  if _OUTPUT.value:
    return _OUTPUT.value
  if os.environ.get("OUT"):
    return os.path.join(os.environ["OUT"], "bench_all.json")
  return os.path.join(REPO, "runs", "bench_all.json")


def main(argv):
  del argv
  unknown = sorted(set(_ONLY.value) - set(NAMES))
  if unknown:
    raise cli.UserError(f"--only: unknown benchmarks {unknown}; choose from {list(NAMES)}")
  smoke = _SMOKE.value
  path = output_path()
  logs = os.path.join(os.path.dirname(os.path.abspath(path)), "bench_all_logs")
  os.makedirs(logs, exist_ok=True)
  report = {"device": device_name(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "smoke": smoke, "budget_s": _BUDGET.value, "seconds": None, "benchmarks": {}}
  start = time.perf_counter()
  cache = tempfile.TemporaryDirectory(prefix="bench_all_cache_") if smoke else None
  env = smoke_env(cache.name) if smoke else None

  def write():
    report["seconds"] = round(time.perf_counter() - start, 1)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)

  for name, module, args, budget, smoke_args, smoke_budget in BENCHMARKS:
    if _ONLY.value and name not in _ONLY.value:
      continue
    args, budget = (smoke_args, smoke_budget) if smoke else (args, budget)
    left = _BUDGET.value - (time.perf_counter() - start)
    if left < MIN_START_S:
      entry = {"command": " ".join(["python", "-m", module, *args]), "rc": None, "seconds": 0.0,
               "timed_out": False, "budget_s": 0, "result": None,
               "tail": f"skipped: {left:.0f} s left of --budget_s={_BUDGET.value}"}
    else:
      entry = run_one(module, args, min(budget, left), os.path.join(logs, f"{name}.log"), env)
    report["benchmarks"][name] = entry
    status = "ok" if entry["rc"] == 0 and entry["result"] is not None else (
        "timed out" if entry["timed_out"] else "FAILED")
    print(f"{name:<13} {status:<9} rc={entry['rc']} {entry['seconds']:7.1f} s "
          f"(budget {entry['budget_s']} s)", flush=True)
    write()  # after each benchmark: a killed run keeps what finished
  write()
  if cache is not None:
    cache.cleanup()
  failed = [n for n, e in report["benchmarks"].items() if e["rc"] != 0 or e["result"] is None]
  print(json.dumps({"output": path, "seconds": report["seconds"], "device": report["device"],
                    "failed": failed}, indent=1))
  if failed:
    raise SystemExit(1)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
