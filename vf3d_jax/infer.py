r"""Single image -> triplanes -> turntable video and textured mesh.

  python -m vf3d_jax.infer --checkpoint model.safetensors --image photo.png --output out/
  python -m vf3d_jax.infer --checkpoint ckpt_dir --image photos/ --output out/ \
      --config configs/infer.py:fast --config.mesh.format=glb
  python -m vf3d_jax.infer --prompt "a red cone on a blue box" --config configs/infer.py:demo

``--prompt`` (repeatable) makes text -> 3D: prompt -> first frame -> orbit
video -> LRM, with the image and video models of the config's ``text`` block
(vf3d_jax/inference/text_to_3d.py); each prompt's folder also holds
``first_frame.png``, ``orbit.mp4`` and ``prompt.txt``.

Without ``--checkpoint`` it uses the embedded tiny demo model, without
``--image`` the example images, both shipped in ``examples/``; ``make demo``
runs exactly that with ``--config configs/infer.py:demo`` (CPU-sized outputs).
Outputs and their layout: see ``vf3d_jax/inference/pipeline.py``. The config,
``--image`` and ``--output`` are checked before the checkpoint is loaded; a
mistake in any of them, or in the checkpoint, is one ``error:`` line and exit
code 1, as is a run where some image failed (each is reported as it fails).
"""

import os

from absl import flags

from vf3d_jax import cli
from vf3d_jax.inference import text_to_3d
from vf3d_jax.inference.pipeline import DEMO_CHECKPOINT, DEMO_IMAGES, REPO, run

_CONFIG = cli.define_config(
    "config", os.path.join(REPO, "configs", "infer.py"), "Inference config.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "", "model.safetensors, a PyTorch pickle or a converted directory "
    "(default: the embedded tiny demo model).")
_IMAGE = flags.DEFINE_string("image", "", "An image or a folder of images (default: examples/images).")
_PROMPT = flags.DEFINE_multi_string(
    "prompt", [], "Text -> 3D: a prompt (repeat the flag for several) instead of images.")
_OUTPUT = flags.DEFINE_string("output", "outputs/infer", "Output folder; one subfolder per image or prompt.")
_DETERMINISTIC = flags.DEFINE_bool("deterministic", False,
                                   "No randomness: zero jitter, fixed importance samples, no orbit offset.")
_SAVE_ARRAYS = flags.DEFINE_bool("save_arrays", False, "Also write planes.npy and frames.npy.")


def main(argv):
  del argv
  if _PROMPT.value:
    if _IMAGE.value:
      raise cli.UserError("give --image or --prompt, not both")
    results = text_to_3d.run(_CONFIG.value, _CHECKPOINT.value or DEMO_CHECKPOINT, _PROMPT.value,
                             _OUTPUT.value, _DETERMINISTIC.value, _SAVE_ARRAYS.value)
    failed = [p for p, r in results.items() if "error" in r]
    if failed:
      raise cli.UserError(f"{len(failed)} of {len(results)} prompts failed")
    return
  results = run(_CONFIG.value, _CHECKPOINT.value or DEMO_CHECKPOINT, _IMAGE.value or DEMO_IMAGES,
                _OUTPUT.value, _DETERMINISTIC.value, _SAVE_ARRAYS.value)
  failed = [p for p, r in results.items() if "error" in r]
  if failed:
    raise cli.UserError(f"{len(failed)} of {len(results)} images failed")


if __name__ == "__main__":
  cli.run(main)
