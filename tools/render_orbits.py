r"""Renders multi-view records of 3D assets (see configs/render.py).

  python -m tools.render_orbits --config configs/render.py:procedural \
      --config.num_assets=8 --config.output_dir=/tmp/vf3d
"""

import os

from vf3d_jax import cli
from vf3d_jax.data import render_orbits

_CONFIG = cli.define_config(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "render.py"),
    "Render configuration.")


def main(argv):
  del argv  # cli.run refuses stray arguments.
  print(render_orbits.render_dataset(_CONFIG.value))


if __name__ == "__main__":
  cli.run(main)
