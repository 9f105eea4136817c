r"""Trains the LRM with the VFusion3D recipe.

  python -m vf3d_jax.train_lrm --config configs/lrm.py:tiny --workdir workdirs/tiny \
      --config.data.train=data/procedural/train --config.data.eval=data/procedural/eval

Re-running the same command resumes from the latest checkpoint in --workdir.
A different config is refused unless --resume says what to do with it:
``--resume=extend`` (with a larger --config.train.steps: the schedule keeps
its decay and the added steps run at its final learning rate) or
``--resume=change`` (take the new config; the schedule follows it).
``--distributed`` runs it over several processes or hosts (see vf3d_jax/cli.py).
See configs/lrm.py for every setting and vf3d_jax/training/lrm_trainer.py for the loop.
"""

import os

from absl import flags
from absl import logging

from vf3d_jax import cli
from vf3d_jax.training import loop
from vf3d_jax.training import lrm_trainer

_CONFIG = cli.define_config(
    "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "lrm.py:tiny"), "LRM config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and images go here.",
                               required=True)
_RESUME = flags.DEFINE_enum("resume", "check", loop.RESUME_MODES, loop.RESUME_HELP)


def main(argv):
  del argv
  logging.set_verbosity(logging.INFO)
  lrm_trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value, resume=_RESUME.value)


if __name__ == "__main__":
  cli.run(main, errors=(loop.TrainingDiverged,), multiprocess=True)
