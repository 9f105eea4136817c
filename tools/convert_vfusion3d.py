r"""Converts a VFusion3D checkpoint to a vf3d_jax pretrained directory (Orbax).

  python -m tools.convert_vfusion3d --input model.safetensors --output checkpoints/vfusion3d

The input is the released ``model.safetensors`` or a PyTorch pickle with a
``model_state_dict``; the architecture is read off the tensor shapes. The
output loads with ``vf3d_jax.pretrained.load_lrm`` (and ``--checkpoint`` of the
inference job) without reading the 1.8 GB file again.
"""

import sys
import time

from absl import app
from absl import flags

from vf3d_jax import cli
from vf3d_jax import pretrained
from vf3d_jax.models.lrm import count_params
from vf3d_jax.weights.state_dict import CheckpointError

_INPUT = flags.DEFINE_string("input", None, "model.safetensors or a PyTorch pickle.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory to create.", required=True)
_POS_RESIZE = flags.DEFINE_enum("pos_resize", "legacy", ["legacy", "current"],
                                "DINOv2 position-table resize the weights were trained with.")


def main(argv):
  del argv
  start = time.perf_counter()
  try:
    arch, params = pretrained.load_lrm(_INPUT.value, pos_resize=_POS_RESIZE.value)
    path = pretrained.save_pretrained(_OUTPUT.value, arch, params)
  except (CheckpointError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"wrote {path}: {count_params(params):,} parameters, "
        f"{arch.layers} transformer layers, planes {arch.triplane_channels}x"
        f"{arch.plane_res}x{arch.plane_res}, in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  cli.run(main)
