r"""Samples orbit videos from prompts and/or first frames.

  python -m vf3d_jax.sample_video --model runs/video/export --output outputs/orbits \
      --prompt "a red torus" --image examples/images/
  python -m vf3d_jax.sample_video --model runs/video/export --output outputs/orbits \
      --prompt "a blue cone" --prompt "a green box" --config.sample.sampler=dpm_solver_pp

Each video goes to <output>/<name>/: orbit.mp4 and frame_XX.png (and, for an
image, the preprocessed first frame as input.png); <name> is prompt_XX or the
image's name (obj_png, obj_jpg where two images share a stem), and each folder
is written under a temporary name and renamed when complete. With --image,
each image starts an orbit (an RGBA image keeps its alpha; others are matted
as in vf3d_jax.infer); prompts pair with images in order, the last prompt
repeating. Sampling settings live in configs/video.py's `sample` block. The
model, images, settings and --output are checked before the model loads; a
mistake is one ``error:`` line and exit code 1.
"""

import os

from absl import flags

from vf3d_jax import cli
from vf3d_jax.video import sampling

_CONFIG = cli.define_config(
    "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "video.py:tiny"),
    "Video config (its `sample` block is used).")
_MODEL = flags.DEFINE_string("model", None, "An exported model (a training run's export/) or "
                             "a training workdir.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Output folder.", required=True)
_PROMPT = flags.DEFINE_multi_string("prompt", [], "Prompt(s); repeat the flag for several.")
_IMAGE = flags.DEFINE_string("image", "", "A first frame, or a folder of them.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
  del argv
  sampling.sample_to_folder(_CONFIG.value, model_path=_MODEL.value, output=_OUTPUT.value,
                            prompts=_PROMPT.value, image=_IMAGE.value, seed=_SEED.value)


if __name__ == "__main__":
  cli.run(main)
