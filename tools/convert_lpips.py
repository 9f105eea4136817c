r"""Converts the PyTorch LPIPS (VGG, v0.1) weights into one ``.npz``.

  python -m tools.convert_lpips --vgg vgg16-397923af.pth \
      --lin vgg.pth --output lpips_vgg.npz

``--vgg`` is torchvision's ImageNet VGG16 state dict, ``--lin`` the lpips
package's ``weights/v0.1/vgg.pth``. Reading them needs torch; the ``.npz``
then loads anywhere with ``vf3d_jax.losses.load_lpips_params``. Takes a few
seconds.
"""

from __future__ import annotations

from absl import app
from absl import flags
import jax
import numpy as np

from vf3d_jax import cli
from vf3d_jax.losses import lpips as lpips_lib

_VGG = flags.DEFINE_string("vgg", None, "torchvision vgg16-397923af.pth", required=True)
_LIN = flags.DEFINE_string("lin", None, "lpips weights/v0.1/vgg.pth", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "the .npz to write", required=True)


def convert_lpips(vgg_path: str, lin_path: str, output_path: str) -> int:
  """Converts and writes the weights; returns the number of parameters."""
  params = lpips_lib.load_lpips_params_from_torch(vgg_path, lin_path)
  lpips_lib.save_lpips_params(params, output_path)
  # Read back through the checking loader so a bad file never leaves here.
  loaded = lpips_lib.load_lpips_params(output_path)
  return sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(loaded))


def main(argv):
  del argv
  count = convert_lpips(_VGG.value, _LIN.value, _OUTPUT.value)
  print(f"wrote {_OUTPUT.value}: {count:,} LPIPS parameters")


if __name__ == "__main__":
  cli.run(main)
