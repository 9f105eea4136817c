r"""Scores a single-image 3D model on a benchmark (protocol: vf3d_jax/evaluation/evaluate.py).

  python -m tools.make_benchmark --config configs/benchmark.py:procedural_v1   # once
  python -m vf3d_jax.evaluate --data data/benchmarks/procedural_v1 --output outputs/eval
  python -m vf3d_jax.evaluate --checkpoint model.safetensors --data photos/ --output outputs/eval \
      --config configs/eval.py:images --config.clip.models=/models/clip-vit-large-patch14

Without ``--checkpoint`` it scores the embedded demo model, as ``infer`` does.
Writes ``objects.jsonl``, ``summary.json``, ``summary.md`` and contact sheets
into ``--output``; an interrupted run resumes there.
"""

import os

from absl import flags

from vf3d_jax import cli
from vf3d_jax.evaluation import evaluate
from vf3d_jax.inference.pipeline import DEMO_CHECKPOINT, REPO

_CONFIG = cli.define_config("config", os.path.join(REPO, "configs", "eval.py"), "Evaluation config.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "", "model.safetensors, a PyTorch pickle or a converted directory "
    "(default: the embedded tiny demo model).")
_DATA = flags.DEFINE_string("data", None, "Benchmark: a folder of record splits, one record "
                            "dataset, or a folder of images (with optional prompts).", required=True)
_OUTPUT = flags.DEFINE_string("output", "outputs/eval", "Output folder (resumable).")


def main(argv):
  del argv
  summary = evaluate.evaluate(_CONFIG.value, _CHECKPOINT.value or DEMO_CHECKPOINT, _DATA.value,
                              _OUTPUT.value)
  print(evaluate.summary_markdown(summary))


if __name__ == "__main__":
  cli.run(main)
