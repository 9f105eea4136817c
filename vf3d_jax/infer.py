r"""Single image -> triplanes -> turntable video and textured mesh.

  python -m vf3d_jax.infer --checkpoint model.safetensors --image photo.png --output out/
  python -m vf3d_jax.infer --checkpoint ckpt_dir --image photos/ --output out/ \
      --config configs/infer.py:fast --config.mesh.format=glb

Without ``--checkpoint`` it uses the embedded tiny demo model, without
``--image`` the example images, both shipped in ``examples/``; ``make demo``
runs exactly that with ``--config configs/infer.py:demo`` (CPU-sized outputs).
Outputs and their layout: see ``vf3d_jax/inference/pipeline.py``.
"""

import os
import sys

from absl import app
from absl import flags

from vf3d_jax import cli
from vf3d_jax.inference.pipeline import DEMO_CHECKPOINT, DEMO_IMAGES, REPO, run
from vf3d_jax.weights.state_dict import CheckpointError

_CONFIG = cli.define_config(
    "config", os.path.join(REPO, "configs", "infer.py"), "Inference config.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "", "model.safetensors, a PyTorch pickle or a converted directory "
    "(default: the embedded tiny demo model).")
_IMAGE = flags.DEFINE_string("image", "", "An image or a folder of images (default: examples/images).")
_OUTPUT = flags.DEFINE_string("output", "outputs/infer", "Output folder; one subfolder per image.")
_DETERMINISTIC = flags.DEFINE_bool("deterministic", False,
                                   "No randomness: zero jitter, fixed importance samples, no orbit offset.")
_SAVE_ARRAYS = flags.DEFINE_bool("save_arrays", False, "Also write planes.npy and frames.npy.")


def main(argv):
  del argv
  config = _CONFIG.value
  checkpoint = _CHECKPOINT.value or DEMO_CHECKPOINT
  image = _IMAGE.value or DEMO_IMAGES
  try:
    results = run(config, checkpoint, image, _OUTPUT.value, _DETERMINISTIC.value,
                  _SAVE_ARRAYS.value, progress=True)
  except (CheckpointError, FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  failed = [p for p, r in results.items() if "error" in r]
  if failed:
    print(f"{len(failed)} of {len(results)} images failed", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
