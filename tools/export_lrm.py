r"""Exports the parameters of a training run as a checkpoint the inference job loads.

  python -m tools.export_lrm --workdir workdirs/tiny --output model.safetensors   # released key layout
  python -m tools.export_lrm --workdir workdirs/tiny --output exported/            # our Orbax directory

Takes the latest checkpoint (or --step) of ``workdir/checkpoints`` and the
architecture from ``workdir/config.json``.
"""

import json
import os
import sys

from absl import app
from absl import flags
import orbax.checkpoint as ocp

from vf3d_jax import cli
from vf3d_jax import pretrained
from vf3d_jax.models.lrm import LRMArch
from vf3d_jax.weights import vfusion3d

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "A .safetensors file or a directory.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def main(argv):
  del argv
  root = os.path.join(os.path.abspath(_WORKDIR.value), "checkpoints")  # Orbax wants absolute paths
  steps = sorted(int(s) for s in os.listdir(root) if s.isdigit()) if os.path.isdir(root) else []
  if not steps:
    sys.exit(f"error: no checkpoints in {root}")
  step = _STEP.value if _STEP.value is not None else steps[-1]
  if step not in steps:
    sys.exit(f"error: no checkpoint {step} in {root} (have {steps})")
  with open(os.path.join(_WORKDIR.value, "config.json")) as f:
    arch = LRMArch.from_dict(json.load(f)["model"])
  params = ocp.StandardCheckpointer().restore(os.path.join(root, str(step), "state"))["params"]
  if _OUTPUT.value.endswith(".safetensors"):
    vfusion3d.save_checkpoint_file(_OUTPUT.value, arch, params)
  else:
    pretrained.save_pretrained(_OUTPUT.value, arch, params)
  print(f"exported step {step} of {_WORKDIR.value} to {_OUTPUT.value}")


if __name__ == "__main__":
  cli.run(main)
