"""Fits one triplane field to multi-view renders of one object.

A stand-in for a reconstruction where the released weights are not at hand:
full-size planes (``[3, 64, 64, 80]`` by default) and a decoder of the released
shape (``240 -> 64 -> 64 -> 64 -> 4``), both initialised as the LRM initialises
them, are optimised by gradient descent (Adam, one learning rate for the planes
and one for the decoder, cosine decay) so that their volume renders match exact
renders of the object. The result is a field with the statistics of a real
reconstruction (a surface at density 1.0, empty space outside, colours on the
surface) for benchmarks of the renderer and the mesher.

Each step renders a random batch of rays of the training views with
:func:`vf3d_jax.rendering.renderer.render_rays` in ``"clean"`` mode (random
stratified and importance samples, 32 + 32 a ray by default) and descends

  ``mean |rgb - target|^2 + opacity_weight * mean (opacity - alpha)^2``

with the colours composited on white. Rays that miss the box are left out of
the batches (every field renders them as the background with opacity 0), and
half of each batch is drawn from the rays the object covers (target alpha
above 0), the rest from all rays that hit the box: the object covers a few
percent of the pixels, and on 2 CPU cores this reaches a given held-out PSNR
in fewer steps (32.8 against 32.0 dB after 300 steps at the default sizes).

Targets are :class:`Views`: straight-alpha renders of a procedural asset
(:func:`procedural_views`, exact ray tracing) or of a mesh file
(:func:`mesh_views`, rasterised), from cameras of :func:`fit_cameras`.
:func:`evaluate` scores a field on held-out views at the released
sampling (64 + 64, ``"compatible"`` mode, deterministic); :func:`save_fit` and
:func:`load_fit` store a fit as safetensors (keys ``planes`` and
``decoder/net_<i>/{kernel,bias}``, JSON metadata under ``vf3d_jax_fit``).

Usage::

  train, held_out = procedural_views(seed=0, index=0, num_views=32, resolution=128)
  result = fit_field(train, FitConfig(steps=1500))
  scores = evaluate(result.decoder_params, result.planes, held_out)
  save_fit("fit.safetensors", result.decoder_params, result.planes, scores)
  decoder_params, planes, metadata = load_fit("fit.safetensors")
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import time
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vf3d_jax.data import meshes
from vf3d_jax.data import orbits
from vf3d_jax.data import procedural
from vf3d_jax.data import rasterize
from vf3d_jax.data import raytrace
from vf3d_jax.models import triplane
from vf3d_jax.rendering import cameras
from vf3d_jax.rendering import renderer
from vf3d_jax.rendering import volume
from vf3d_jax.weights import state_dict

# safetensors metadata entry holding a fit's metadata as JSON.
METADATA_KEY = "vf3d_jax_fit"
FORMAT_VERSION = 1
PLANES_KEY = "planes"
DECODER_PREFIX = "decoder/"


@dataclasses.dataclass(frozen=True)
class FitConfig:
  """Sizes and optimisation of a fit (defaults: the released field's sizes)."""

  plane_res: int = 64  # side of each plane (released: 64)
  plane_channels: int = 80  # feature channels (released: 80)
  decoder_hidden: int = 64  # hidden width of the decoder (released: 64)
  decoder_layers: int = 4  # Dense layers of the decoder (released: 4)
  plane_init_std: float = 1.0  # std of the initial planes (a fresh LRM's: 1)
  steps: int = 500  # optimisation steps
  batch_rays: int = 1024  # rays a step
  num_coarse: int = 32  # stratified samples a ray during the fit
  num_fine: int = 32  # importance samples a ray during the fit
  plane_lr: float = 0.03  # peak Adam learning rate of the planes
  decoder_lr: float = 0.003  # peak Adam learning rate of the decoder
  warmup_steps: int = 50  # linear warm-up of both learning rates
  final_lr_fraction: float = 0.05  # cosine decay to this fraction of the peak
  opacity_weight: float = 1.0  # weight of the opacity term
  foreground_fraction: float = 0.5  # share of each batch drawn from rays with alpha > 0
  box_size: float = 2.0  # side of the cube the planes span
  chunk_size: int = 8192  # rays the renderer evaluates together
  seed: int = 0  # initialisation, ray batches and render noise

  def __post_init__(self):
    for name in ("plane_res", "plane_channels", "decoder_hidden", "decoder_layers", "steps",
                 "batch_rays", "chunk_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.decoder_layers < 2:
      raise ValueError(f"decoder_layers must be at least 2, got {self.decoder_layers}")
    for name in ("plane_lr", "decoder_lr", "plane_init_std"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.opacity_weight < 0 or not 0 <= self.final_lr_fraction <= 1:
      raise ValueError("opacity_weight must be >= 0 and final_lr_fraction in [0, 1]")
    if not 0 <= self.foreground_fraction <= 1:
      raise ValueError(f"foreground_fraction must be in [0, 1], got {self.foreground_fraction}")
    renderer.RenderOptions(num_coarse=self.num_coarse, num_fine=self.num_fine)  # validates

  def render_options(self) -> renderer.RenderOptions:
    """The renderer options of the fit's steps."""
    return renderer.RenderOptions(num_coarse=self.num_coarse, num_fine=self.num_fine,
                                  mode="clean", box_size=self.box_size,
                                  chunk_size=self.chunk_size)


class Views(NamedTuple):
  """Renders of one object: the targets of a fit, or its held-out views."""

  rgb: np.ndarray  # [V, R, R, 3] float32 colours composited on white
  alpha: np.ndarray  # [V, R, R] float32 coverage in [0, 1]
  c2w: np.ndarray  # [V, 4, 4] float32 OpenGL camera-to-world
  intrinsics: np.ndarray  # [V, 4] float32 normalised intrinsics

  @classmethod
  def from_rgba(cls, rgba, c2w, intrinsics) -> "Views":
    """Views from straight-alpha renders ``rgba [V, R, R, 4]``."""
    rgba = np.asarray(rgba, np.float32)
    alpha = rgba[..., 3]
    rgb = rgba[..., :3] * alpha[..., None] + (1.0 - alpha[..., None])
    return cls(rgb.astype(np.float32), alpha.astype(np.float32),
               np.asarray(c2w, np.float32), np.asarray(intrinsics, np.float32))

  @property
  def resolution(self) -> int:
    return int(self.rgb.shape[1])


class FitResult(NamedTuple):
  """What :func:`fit_field` returns."""

  decoder_params: dict  # {"net_0": {"kernel", "bias"}, ...} float32 numpy
  planes: np.ndarray  # [3, H, W, C] float32
  losses: np.ndarray  # [steps] total loss of each step's batch
  seconds: float  # wall time of the optimisation, compilation included


def fit_cameras(num_views: int, seed: int = 0, radius: Optional[float] = None):
  """Cameras around the origin that see every side of an object.

  Azimuths and elevations follow a Fibonacci spiral over the sphere (golden
  angle steps in azimuth, equal-area steps in height), from elevation -30 to
  75 degrees: even coverage without the near-vertical views that objects
  standing on the ground are never seen from. ``seed`` rotates the spiral
  about the vertical axis and shifts its heights.

  Args:
    num_views: cameras.
    seed: rotation of the spiral; different seeds give interleaved cameras
      (held-out views).
    radius: distance from the origin; None: ``orbits.fit_distance`` at the
      released field of view (3.12), the whole box in view.

  Returns:
    ``(c2w [V, 4, 4], intrinsics [V, 4])`` float32.
  """
  if num_views < 1:
    raise ValueError(f"need at least one view, got {num_views}")
  rng = np.random.default_rng([seed, 0xF17])
  i = np.arange(num_views) + 0.5
  low, high = math.sin(math.radians(-30)), math.sin(math.radians(75))
  offset = rng.uniform(0, 1)
  heights = low + (high - low) * np.mod(i / num_views + offset / num_views, 1.0)
  elevation = np.arcsin(heights)
  azimuth = np.mod(math.pi * (3 - math.sqrt(5)) * i + 2 * math.pi * rng.uniform(), 2 * math.pi)
  spec = orbits.ViewSpec(radius=radius)
  return orbits.cameras_from_angles(azimuth, elevation, spec.distance, spec.fov_degrees)


def procedural_views(seed: int, index: int, num_views: int, resolution: int,
                     max_primitives: int = 3, num_held_out: int = 4,
                     held_out_resolution: Optional[int] = None, supersample: int = 2):
  """Exact renders of a procedural asset for a fit, and held-out views.

  Args:
    seed: dataset seed of ``procedural.sample_asset``.
    index: asset number.
    num_views: training views.
    resolution: side of the training views.
    max_primitives: most primitives of the asset.
    num_held_out: held-out views (cameras between the training ones).
    held_out_resolution: their side; None: ``resolution``.
    supersample: rays a pixel along each axis (anti-aliased alpha).

  Returns:
    ``(train, held_out)`` :class:`Views`.
  """
  asset = procedural.sample_asset(seed, index, max_primitives)
  packed = procedural.pack_assets([asset], max_primitives)

  def render(num, size, camera_seed):
    c2w, intrinsics = fit_cameras(num, camera_seed)
    rgba, _ = raytrace.render_assets(packed, c2w[None], intrinsics[None], size, supersample)
    return Views.from_rgba(np.asarray(rgba)[0], c2w, intrinsics)

  return (render(num_views, resolution, 0),
          render(num_held_out, held_out_resolution or resolution, 1))


def mesh_views(path: str, num_views: int, resolution: int, num_held_out: int = 4,
               held_out_resolution: Optional[int] = None, supersample: int = 2,
               up_axis: str = "y"):
  """:func:`procedural_views` for a mesh file (normalised into ``[-1, 1]^3``).

  Raises:
    FileNotFoundError, ValueError: see ``vf3d_jax.data.meshes.load_mesh``.
  """
  mesh = meshes.load_mesh(path, up_axis=up_axis)

  def render(num, size, camera_seed):
    c2w, intrinsics = fit_cameras(num, camera_seed)
    rgba, _ = rasterize.render_mesh(mesh, c2w, intrinsics, size, supersample)
    return Views.from_rgba(np.asarray(rgba), c2w, intrinsics)

  return (render(num_views, resolution, 0),
          render(num_held_out, held_out_resolution or resolution, 1))


def init_field(config: FitConfig, key: jax.Array):
  """Planes and decoder initialised as the LRM initialises them.

  The decoder is ``TriplaneDecoder``'s initialisation; the planes are normal
  with std ``config.plane_init_std`` (1: the scale of a fresh LRM's
  upsampler output, see ``vf3d_jax.models.lrm.Upsampler``).

  Returns:
    ``(decoder_params, planes [3, R, R, C])``.
  """
  key_decoder, key_planes = jax.random.split(key)
  decoder = triplane.TriplaneDecoder(config.decoder_hidden, config.decoder_layers)
  decoder_params = decoder.init(key_decoder,
                                jnp.zeros((1, 3 * config.plane_channels), jnp.float32))["params"]
  planes = config.plane_init_std * jax.random.normal(
      key_planes, (3, config.plane_res, config.plane_res, config.plane_channels), jnp.float32)
  return jax.tree.map(jnp.asarray, dict(decoder_params)), planes


def _flat_rays(views: Views, box_size: float):
  """Rays of every pixel of ``views`` that hit the box, with their targets (numpy)."""
  origins, directions = jax.vmap(lambda c, k: cameras.generate_rays(c, k, views.resolution))(
      jnp.asarray(views.c2w), jnp.asarray(views.intrinsics))
  origins = np.asarray(origins).reshape(-1, 3)
  directions = np.asarray(directions).reshape(-1, 3)
  _, t_far, hit = volume.intersect_box(jnp.asarray(origins), jnp.asarray(directions), box_size)
  keep = np.asarray(hit & (t_far > 0))
  return {"origin": origins[keep], "direction": directions[keep],
          "rgb": views.rgb.reshape(-1, 3)[keep], "alpha": views.alpha.reshape(-1)[keep]}


def _optimizer(config: FitConfig):
  def schedule(peak):
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, min(config.warmup_steps, max(config.steps - 1, 1)),
        max(config.steps, config.warmup_steps + 1), peak * config.final_lr_fraction)
  return optax.multi_transform(
      {"planes": optax.adam(schedule(config.plane_lr)),
       "decoder": optax.adam(schedule(config.decoder_lr))},
      lambda params: {"planes": "planes",
                      "decoder": jax.tree.map(lambda _: "decoder", params["decoder"])})


def fit_loss(params, rays, key, options: renderer.RenderOptions, opacity_weight: float):
  """The fit's loss on a batch of rays.

  Args:
    params: ``{"planes": [3, H, W, C], "decoder": {...}}``.
    rays: ``origin [N, 3], direction [N, 3], rgb [N, 3]`` (on white) and
      ``alpha [N]``.
    key: render noise.
    options: renderer options (white background).
    opacity_weight: weight of the opacity term.

  Returns:
    ``(loss, {"mse", "opacity", "psnr"})``.
  """
  out = renderer.render_rays(params["decoder"], params["planes"], rays["origin"],
                             rays["direction"], key=key, options=options)
  mse = jnp.mean(jnp.square(out["rgb"] - rays["rgb"]))
  opacity = jnp.mean(jnp.square(out["opacity"] - rays["alpha"]))
  return mse + opacity_weight * opacity, {"mse": mse, "opacity": opacity,
                                          "psnr": -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))}


@functools.partial(jax.jit, static_argnames=("config",), donate_argnums=(0, 1))
def _step(params, opt_state, data, step, key, config: FitConfig):
  """One optimisation step on a random batch of ``data``'s rays."""
  key = jax.random.fold_in(key, step)
  key_batch, key_render = jax.random.split(key)
  num_foreground = round(config.batch_rays * config.foreground_fraction)
  key_all, key_foreground = jax.random.split(key_batch)
  index = jax.random.randint(key_all, (config.batch_rays - num_foreground,), 0,
                             data["alpha"].shape[0])
  if num_foreground:
    picks = jax.random.randint(key_foreground, (num_foreground,), 0,
                               data["foreground"].shape[0])
    index = jnp.concatenate([index, data["foreground"][picks]])
  batch = jax.tree.map(lambda x: x[index], {k: v for k, v in data.items() if k != "foreground"})
  (loss, terms), grads = jax.value_and_grad(fit_loss, has_aux=True)(
      params, batch, key_render, config.render_options(), config.opacity_weight)
  updates, opt_state = _optimizer(config).update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, dict(terms, loss=loss)


def fit_field(train: Views, config: FitConfig = FitConfig(),
              log: Optional[Callable[[int, Mapping[str, float]], None]] = None,
              log_every: int = 100) -> FitResult:
  """Optimises planes and a decoder against the training views.

  Args:
    train: the target renders.
    config: sizes and optimisation.
    log: called as ``log(step, metrics)`` every ``log_every`` steps and after
      the last, with the batch's ``loss``, ``mse``, ``opacity``, ``psnr`` (of
      the batch's colours) and ``seconds`` since the start.
    log_every: steps between calls of ``log``.

  Returns:
    A :class:`FitResult`.
  """
  start = time.perf_counter()
  data = _flat_rays(train, config.box_size)
  if not data["alpha"].size:
    raise ValueError("no training ray hits the box: the cameras do not see the object")
  data["foreground"] = np.flatnonzero(data["alpha"] > 0).astype(np.int32)
  if not data["foreground"].size:
    data["foreground"] = np.arange(data["alpha"].size, dtype=np.int32)
  data = jax.tree.map(jnp.asarray, data)
  key = jax.random.key(config.seed)
  key_init, key_steps = jax.random.split(key)
  decoder_params, planes = init_field(config, key_init)
  params = {"planes": planes, "decoder": decoder_params}
  opt_state = _optimizer(config).init(params)
  losses = []
  for step in range(config.steps):
    params, opt_state, metrics = _step(params, opt_state, data, jnp.int32(step), key_steps,
                                       config)
    last = step == config.steps - 1
    if log is not None and ((step + 1) % log_every == 0 or last):
      values = {name: float(value) for name, value in metrics.items()}
      values["seconds"] = time.perf_counter() - start
      log(step + 1, values)
    losses.append(metrics["loss"])
  params = jax.device_get(params)
  decoder = jax.tree.map(lambda x: np.asarray(x, np.float32), params["decoder"])
  return FitResult(decoder, np.asarray(params["planes"], np.float32),
                   np.asarray(jax.device_get(losses), np.float32), time.perf_counter() - start)


@functools.partial(jax.jit, static_argnames=("resolution", "options"))
def _render(decoder_params, planes, c2w, intrinsics, resolution, options):
  out = renderer.render_views(decoder_params, planes, c2w, intrinsics, resolution,
                              options=options)
  return out["rgb"], out["opacity"]


def render(decoder_params, planes, views: Views, options: Optional[renderer.RenderOptions] = None):
  """Renders a field from the cameras of ``views``, one view at a time.

  Args:
    decoder_params: the decoder's parameters.
    planes: ``[3, H, W, C]``.
    views: cameras and resolution.
    options: renderer options; None: as released (64 + 64 samples,
      ``"compatible"`` mode, white background), deterministic.

  Returns:
    ``(rgb [V, R, R, 3], opacity [V, R, R])`` numpy float32.
  """
  options = options or renderer.RenderOptions()
  rgbs, opacities = [], []
  for c2w, intrinsics in zip(views.c2w, views.intrinsics):
    rgb, opacity = _render(decoder_params, planes, jnp.asarray(c2w[None]),
                           jnp.asarray(intrinsics[None]), views.resolution, options)
    rgbs.append(np.asarray(rgb[0]))
    opacities.append(np.asarray(opacity[0]))
  return np.stack(rgbs), np.stack(opacities)


def psnr(pred: np.ndarray, target: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
  """PSNR in dB of images in ``[0, 1]``, over all their pixels (or the ``mask``ed ones)."""
  error = np.square(np.asarray(pred, np.float64) - np.asarray(target, np.float64))
  mse = float(np.mean(error) if mask is None else np.mean(error[np.asarray(mask, bool)]))
  return 10.0 * math.log10(1.0 / max(mse, 1e-20))


def evaluate(decoder_params, planes, views: Views,
             options: Optional[renderer.RenderOptions] = None) -> dict[str, float]:
  """Scores the field's renders against ``views``.

  Args:
    decoder_params: the decoder's parameters.
    planes: ``[3, H, W, C]``.
    views: the target renders (held-out views).
    options: as :func:`render`; by default the released sampling, 64 + 64 a
      ray in ``"compatible"`` mode, on white.

  Returns:
    ``{"psnr", "object_psnr", "opacity_mae"}``: PSNR (dB) over all pixels of
    all views together; PSNR over the pixels the object or the render covers
    (target alpha or rendered opacity above 0.01); mean absolute error of the
    rendered opacity against the alpha.
  """
  rgb, opacity = render(decoder_params, planes, views, options)
  covered = (views.alpha > 0.01) | (opacity > 0.01)
  return {"psnr": psnr(rgb, views.rgb),
          "object_psnr": psnr(rgb, views.rgb, covered) if covered.any() else math.inf,
          "opacity_mae": float(np.mean(np.abs(opacity - views.alpha)))}


@functools.partial(jax.jit, static_argnames=("box_size",))
def _density(decoder_params, planes, points, box_size):
  raw, _ = triplane.query_field(decoder_params, planes, points, box_size)
  return triplane.density_activation(raw)


def density_range(decoder_params, planes, resolution: int = 128, box_size: float = 2.0,
                  threshold: float = 1.0) -> dict[str, float]:
  """The activated density (``softplus(raw - 1)``) on a grid over the box.

  The grid is the mesher's: ``resolution`` points a side from ``-box/2`` to
  ``box/2``.

  Returns:
    ``{"min", "max", "fraction_above"}``: the extremes and the fraction of
    grid points whose density exceeds ``threshold`` (the mesh's level set is
    a surface only if that is strictly between 0 and 1).
  """
  axis = np.linspace(-box_size / 2, box_size / 2, resolution, dtype=np.float32)
  low, high, above = math.inf, -math.inf, 0
  planes = jnp.asarray(planes)
  for x in axis:  # one x-slab a call: the same compiled program each time
    yy, zz = np.meshgrid(axis, axis, indexing="ij")
    points = np.stack([np.full_like(yy, x), yy, zz], axis=-1).reshape(-1, 3)
    density = np.asarray(_density(decoder_params, planes, jnp.asarray(points), box_size))
    low, high = min(low, float(density.min())), max(high, float(density.max()))
    above += int(np.count_nonzero(density > threshold))
  return {"min": low, "max": high, "fraction_above": above / resolution ** 3}


def save_fit(path: str | os.PathLike, decoder_params, planes, metadata: Mapping[str, Any]):
  """Writes a fit as safetensors, atomically (a temporary file, then a rename).

  Args:
    path: the output file; missing folders above it are created.
    decoder_params: ``{"net_0": {"kernel", "bias"}, ...}``.
    planes: ``[3, H, W, C]``.
    metadata: JSON-serialisable facts about the fit (asset, steps, PSNR, ...).
  """
  state = {PLANES_KEY: np.asarray(planes, np.float32)}
  for layer, values in decoder_params.items():
    for name, value in values.items():
      state[f"{DECODER_PREFIX}{layer}/{name}"] = np.asarray(value, np.float32)
  meta = dict(metadata, format_version=FORMAT_VERSION)
  check_output(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  state_dict.write_safetensors(state, path,
                               metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})


def check_output(path: str | os.PathLike) -> None:
  """Fails early when a fit cannot be written to ``path``; creates nothing.

  The first existing folder on the way to ``path`` must be a writable folder
  (:func:`save_fit` creates the missing ones), and a file already at ``path``
  must be a fit (it is replaced; anything else is more likely a mistyped
  path).

  Raises:
    IsADirectoryError: ``path`` is a folder.
    FileExistsError: a file that is not a fit is at ``path``.
    NotADirectoryError: a file is in the way of its folder.
    PermissionError: that folder is not writable.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    raise IsADirectoryError(f"output {path}: is a folder; give a file name such as "
                            f"{os.path.join(path, 'fit.safetensors')}")
  if os.path.isfile(path):
    try:
      load_fit(path)
    except ValueError:
      raise FileExistsError(f"output {path}: exists and is not a triplane fit; not replacing "
                            "it") from None
  folder = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(folder):
    folder = os.path.dirname(folder)
  if not os.path.isdir(folder):
    raise NotADirectoryError(f"output {path}: a file ({folder}) is in the way of its folder")
  if not os.access(folder, os.W_OK | os.X_OK):
    raise PermissionError(f"output {path}: cannot write in {folder}")


def load_fit(path: str | os.PathLike):
  """Reads a fit written by :func:`save_fit`.

  Returns:
    ``(decoder_params, planes, metadata)``: ``{"net_0": {"kernel", "bias"},
    ...}`` and ``[3, H, W, C]`` as float32 numpy arrays, exactly as saved, and
    the metadata dict.

  Raises:
    ValueError: the file is not a fit (a ``CheckpointError`` when it is no
      safetensors file at all); FileNotFoundError: there is no such file.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file")
  metadata = state_dict.read_safetensors_metadata(path)
  if METADATA_KEY not in metadata:
    raise ValueError(f"{path}: not a triplane fit (no {METADATA_KEY} metadata)")
  try:
    meta = json.loads(metadata[METADATA_KEY])
  except ValueError:
    raise ValueError(f"{path}: corrupt triplane fit metadata") from None
  state = state_dict.read_state_dict(path)
  planes = state.pop(PLANES_KEY, None)
  decoder: dict[str, dict[str, np.ndarray]] = {}
  for key, value in state.items():
    layer, _, name = key[len(DECODER_PREFIX):].partition("/")
    if (not key.startswith(DECODER_PREFIX) or not re.fullmatch(r"net_\d+", layer)
        or name not in ("kernel", "bias")):
      raise ValueError(f"{path}: not a triplane fit (unexpected tensor {key!r})")
    decoder.setdefault(layer, {})[name] = value
  if planes is None or planes.ndim != 4 or planes.shape[0] != 3 or not decoder:
    raise ValueError(f"{path}: not a triplane fit (needs planes [3, H, W, C] and a decoder)")
  if any(set(values) != {"kernel", "bias"} for values in decoder.values()):
    raise ValueError(f"{path}: not a triplane fit (a decoder layer lacks its kernel or bias)")
  names = triplane.decoder_layer_names(decoder)
  widths = [decoder[name]["kernel"].shape for name in names]
  if widths[0][0] != 3 * planes.shape[-1] or any(
      a[1] != b[0] for a, b in zip(widths, widths[1:])) or widths[-1][1] != 4:
    raise ValueError(f"{path}: not a triplane fit (decoder shapes {widths} do not fit planes "
                     f"{list(planes.shape)})")
  return decoder, planes, meta
