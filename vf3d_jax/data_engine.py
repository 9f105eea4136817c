r"""The data engine: prompts -> filtered, elevation-annotated synthetic multi-view records.

  python -m vf3d_jax.data_engine --config configs/engine.py:tiny --workdir runs/engine \
      --config.video.model=runs/video --config.elevation.train=data/orbits/1.0.0
  python -m vf3d_jax.data_engine ... --stage=videos          # one stage (resumable)
  python -m vf3d_jax.data_engine ... --distributed            # every process takes its shards

Stages and outputs: vf3d_jax/engine/engine.py. Then train the LRM on the result:
``python -m vf3d_jax.train_lrm --config.data.train=runs/engine/records:1,data/3d:0.2``.
"""

import json
import os

from absl import flags

from vf3d_jax import cli
from vf3d_jax.engine import engine
from vf3d_jax.inference.pipeline import REPO

_CONFIG = cli.define_config("config", os.path.join(REPO, "configs", "engine.py"), "Engine config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the stages write (resumable).", required=True)
_STAGE = flags.DEFINE_list("stage", list(engine.STAGES),
                           f"Stages to run, in order: {', '.join(engine.STAGES)}.")


def main(argv):
  del argv
  reports = engine.run(_CONFIG.value, _WORKDIR.value, _STAGE.value)
  print(json.dumps(reports, indent=1, default=str))


if __name__ == "__main__":
  cli.run(main, multiprocess=True)
