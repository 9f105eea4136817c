r"""Trains the multi-view video model: the image UNet, then its temporal adapters.

  python -m vf3d_jax.train_video --config configs/video.py:tiny_image --workdir runs/image \
      --config.data.train=data/orbits/1.0.0 --config.data.eval=data/orbits_eval/1.0.0
  python -m vf3d_jax.train_video --config configs/video.py:tiny --workdir runs/video \
      --config.data.train=data/orbits/1.0.0 --config.data.eval=data/orbits_eval/1.0.0 \
      --config.init.unet=runs/image/export

Re-running the same command resumes from the latest checkpoint in --workdir; a
finished run leaves its model in <workdir>/export. A different config is
refused unless --resume says what to do with it (``extend``: a larger
train.steps whose added steps run at the schedule's final learning rate;
``change``: take the new config). See configs/video.py for every setting and
vf3d_jax/training/video_trainer.py for the loop.
"""

import os

from absl import flags
from absl import logging

from vf3d_jax import cli
from vf3d_jax.training import loop
from vf3d_jax.training import video_trainer
from vf3d_jax.weights.state_dict import CheckpointError

_CONFIG = cli.define_config(
    "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "video.py:tiny"), "Video model config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics, samples and the export.",
                               required=True)
_RESUME = flags.DEFINE_enum("resume", "check", loop.RESUME_MODES, loop.RESUME_HELP)


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  video_trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value, resume=_RESUME.value)


if __name__ == "__main__":
  cli.run(main, errors=(loop.TrainingDiverged, CheckpointError), multiprocess=True)
