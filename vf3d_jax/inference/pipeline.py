r"""The single image -> triplanes -> turntable video and textured mesh pipeline.

``python -m vf3d_jax.infer`` (see its docstring for the commands) is the
command-line front of this module; notebooks call :func:`run` or
:class:`Reconstructor` directly.

For each image ``out/<name>/`` receives ``input.png`` (the preprocessed
model input), ``turntable.mp4`` (or ``.gif``), ``mesh.obj`` (or ``.glb`` /
``.ply``) and, with ``--save_arrays``, ``planes.npy`` ``[3, C, H, W]`` and
``frames.npy`` ``[views, H, W, 3]`` float32. ``<name>`` is the image's file
name without its extension, or with it (``obj_png``, ``obj_jpg``) where two
inputs share a stem (:func:`output_names`). Each folder is written under a
temporary name and renamed when complete (:func:`write_folder`), so a failed
or interrupted image leaves no folder, and a previous run's folder of the
same name is replaced only by a complete one.

Progress bars (``progress``): ``True`` always, ``False`` never, ``None`` (the
default) only when stderr is a terminal, so logs get no redrawn bars.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import shutil
import sys
import time
import warnings
from typing import Any, Callable, Sequence, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import tqdm

from vf3d_jax import pretrained
from vf3d_jax.inference import mesh as mesh_lib
from vf3d_jax.inference import preprocess
from vf3d_jax.inference import texture as texture_lib
from vf3d_jax.models.lrm import LRM, LRMArch
from vf3d_jax.rendering import cameras
from vf3d_jax.rendering import renderer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_CHECKPOINT = os.path.join(REPO, "examples", "lrm_tiny.safetensors")
DEMO_IMAGES = os.path.join(REPO, "examples", "images")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
T = TypeVar("T")


def no_bar(progress: bool | None) -> bool | None:
  """tqdm's ``disable`` for ``progress`` (None: a bar only on a terminal)."""
  return None if progress is None else not progress


@dataclasses.dataclass
class Reconstruction:
  """What one image produced."""

  image: np.ndarray  # [S, S, 3] float32 model input
  planes: np.ndarray  # [3, H, W, C] float32
  frames: np.ndarray | None  # [views, R, R, 3] float32 in [0, 1]
  mesh: mesh_lib.Mesh | None
  mesh_error: str | None  # why there is no mesh (e.g. an empty surface)
  seconds: dict[str, float]
  matte: str = "image"  # where the object mask came from: "image" (alpha) or the matting method
  foreground_fraction: float = 0.0  # of the (working-size) input covered by the mask
  matte_warning: str | None = None  # a built-in matte that is likely wrong, and what to do
  mesh_cleanup: mesh_lib.Cleanup | None = None  # floaters and decimation
  alpha: np.ndarray | None = None  # [H', W'] float32: the mask used, at the working size


class Reconstructor:
  """Compiled image -> planes -> video/mesh functions of one model and config."""

  def __init__(self, arch: LRMArch, params, config):
    self.arch, self.params, self.config = arch, params, config
    model = LRM(arch, dtype=jnp.dtype(config.model.dtype),
                attention_impl=config.model.attention_impl or None)
    self._planes = jax.jit(lambda p, x, c: model.apply({"params": p}, x, c))
    r = config.render
    fast = {name: r[name] for name in ("occupancy_resolution", "occupancy_threshold",
                                       "occupancy_dilation", "occupancy_subdivision",
                                       "num_probes", "termination", "proposal") if name in r}
    self.render_options = renderer.RenderOptions(
        num_coarse=r.num_coarse, num_fine=r.num_fine, mode=r.mode, chunk_size=r.chunk_size,
        mlp_dtype=r.mlp_dtype, planes_dtype=r.planes_dtype or None, **fast)
    self._render = jax.jit(renderer.render_views, static_argnames=("resolution", "options"))
    self._occupancy = jax.jit(renderer.occupancy_field, static_argnames=("options",))
    self.decoder_params = params["synthesizer"]["decoder"]

  def planes(self, image: np.ndarray, camera: np.ndarray | None = None) -> jax.Array:
    """``[S, S, 3]`` -> ``[3, H, W, C]``, conditioned on ``camera`` (``[16]``; default: the
    default source camera)."""
    camera = cameras.DEFAULT_SOURCE_CAMERA if camera is None else camera
    return self._planes(self.params, jnp.asarray(image)[None], jnp.asarray(camera)[None])[0]

  def occupancy(self, planes: jax.Array) -> jax.Array | None:
    """The fast mode's occupancy grid of ``planes`` (None in the other modes): build it
    once per object and pass it to every render of it."""
    if self.render_options.mode != "fast":
      return None
    return self._occupancy(self.decoder_params, planes, options=self.render_options)

  def render_cameras(self, planes: jax.Array, c2w, intrinsics, resolution: int,
                     key: jax.Array | None = None,
                     occupancy: jax.Array | None = None) -> dict[str, jax.Array]:
    """``render_views`` of ``planes`` from ``c2w [V, 4, 4]``, ``intrinsics [V, 4]``
    (in the fast mode with ``occupancy``, else a grid built for the call)."""
    if occupancy is None:
      occupancy = self.occupancy(planes)
    return self._render(self.decoder_params, planes, jnp.asarray(c2w), jnp.asarray(intrinsics),
                        resolution=resolution, key=key, options=self.render_options,
                        occupancy=occupancy)

  def turntable_cameras(self, key: jax.Array | None):
    """``([V, 4, 4], [V, 4])``: the orbit, its angle offset ~ U(0, 1 degree) unless deterministic."""
    r = self.config.render
    offset = 0.0 if key is None else jax.random.uniform(key, (), maxval=np.pi / 180)
    c2w = cameras.orbit_cameras(r.num_views, r.radius, np.radians(r.elevation_deg), offset)
    intrinsics = jnp.broadcast_to(jnp.asarray(cameras.DEFAULT_INTRINSICS), (r.num_views, 4))
    return c2w, intrinsics

  def turntable(self, planes: jax.Array, key: jax.Array | None, progress: bool | None = None):
    """``[V, R, R, 3]`` float32 frames; views rendered ``views_per_call`` at a time, each
    call's frames copied to the host while the next call runs."""
    r = self.config.render
    camera_key, noise_key = (None, None) if key is None else jax.random.split(key)
    if not r.get("jitter", True):
      noise_key = None  # samples at fixed places: with few samples a ray, jitter is noise
    c2w, intrinsics = self.turntable_cameras(camera_key)
    frames = []
    occupancy = self.occupancy(planes)  # once for all views
    pending = None
    step = max(1, r.views_per_call)
    for i in tqdm.trange(0, r.num_views, step, desc="turntable", unit="call",
                         disable=no_bar(progress), leave=False):
      # Each call gets its own key so views of different calls draw different samples.
      call_key = None if noise_key is None else jax.random.fold_in(noise_key, i)
      out = self._render(self.decoder_params, planes, c2w[i:i + step], intrinsics[i:i + step],
                         resolution=r.resolution, key=call_key, options=self.render_options,
                         occupancy=occupancy)
      if pending is not None:  # dispatched: the previous frames come out while it runs
        frames.append(np.asarray(pending))
      pending = out["rgb"]
    if pending is not None:
      frames.append(np.asarray(pending))
    return np.clip(np.concatenate(frames), 0.0, 1.0)

  def mesh(self, planes: jax.Array, progress: bool | None = None,
           seconds: dict[str, float] | None = None
           ) -> tuple[mesh_lib.Mesh, mesh_lib.Cleanup]:
    """The density grid (coarse to fine with ``mesh.coarse_block``), marching cubes,
    floaters removed, decimated to ``mesh.max_faces``, then (with
    ``mesh.texture=uv``) unwrapped and baked; ``seconds`` receives ``mesh`` and ``texture``.
    Returns the mesh and what the clean-up removed."""
    m = self.config.mesh
    seconds = {} if seconds is None else seconds
    start = time.perf_counter()
    query = mesh_lib.field_query_fn(self.params, planes)
    mesh = mesh_lib.extract_mesh(query, m.resolution, m.threshold, m.chunk, progress=progress,
                                 coarse_block=m.get("coarse_block", 0))
    mesh, cleanup = mesh_lib.clean(mesh, m.min_component, m.max_faces, query,
                                             m.chunk)
    seconds["mesh"] = time.perf_counter() - start
    if m.texture == "uv":
      start = time.perf_counter()
      mesh = texture_lib.bake_texture(mesh, query, m.texture_size, chunk=m.chunk)
      seconds["texture"] = time.perf_counter() - start
    return mesh, cleanup

  def __call__(self, image_path, key: jax.Array | None,
               progress: bool | None = None) -> Reconstruction:
    seconds = {}
    start = time.perf_counter()
    image, info = preprocess.preprocess_image(
        image_path, size=self.arch.input_size,
        foreground_ratio=self.config.preprocess.foreground_ratio,
        matting_fn=self.config.preprocess.matting,
        max_side=self.config.preprocess.max_side,
        strict=self.config.preprocess.get("strict", False))
    seconds["preprocess"] = time.perf_counter() - start

    start = time.perf_counter()
    planes = jax.block_until_ready(self.planes(image))
    seconds["planes"] = time.perf_counter() - start

    frames = None
    if self.config.render.enabled:
      start = time.perf_counter()
      frames = self.turntable(planes, key, progress)
      seconds["video"] = time.perf_counter() - start

    mesh, mesh_error, cleanup = None, None, None
    if self.config.mesh.enabled:
      start = time.perf_counter()
      try:
        mesh, cleanup = self.mesh(planes, progress, seconds)
      except mesh_lib.EmptyMeshError as e:
        mesh_error = str(e)
        seconds["mesh"] = time.perf_counter() - start
    return Reconstruction(image, np.asarray(planes), frames, mesh, mesh_error, seconds,
                          matte=info["alpha_source"],
                          foreground_fraction=float(np.mean(info["alpha"] > 0.5)),
                          matte_warning=info.get("matte_warning"), mesh_cleanup=cleanup,
                          alpha=np.asarray(info["alpha"], np.float32))


def _atomic(path: str, write) -> str:
  """Calls ``write(temp_path)`` then renames the result to ``path``."""
  root, ext = os.path.splitext(path)
  tmp = f"{root}.tmp-{os.getpid()}{ext}"
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def write_video(frames: np.ndarray, path: str, fps: int) -> str:
  """Writes ``[V, H, W, 3]`` float frames in [0, 1] as mp4 or gif (by extension)."""
  import imageio.v2 as imageio  # pylint: disable=g-import-not-at-top

  data = (np.clip(frames, 0.0, 1.0) * 255).astype(np.uint8)  # truncation, as upstream

  def write(tmp):
    warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
    if path.endswith(".gif"):
      imageio.mimsave(tmp, list(data), duration=1000 / fps, loop=0)
    else:
      imageio.mimsave(tmp, list(data), fps=fps, codec="libx264", quality=8,
                      macro_block_size=1, ffmpeg_log_level="error")

  return _atomic(path, write)


def save_reconstruction(result: Reconstruction, folder: str, config,
                        save_arrays: bool) -> list[str]:
  """Writes one image's outputs into ``folder``; returns the paths written."""
  os.makedirs(folder, exist_ok=True)
  written = [_atomic(os.path.join(folder, "input.png"), lambda p: Image.fromarray(
      (np.clip(result.image, 0, 1) * 255).round().astype(np.uint8)).save(p))]
  if result.frames is not None:
    written.append(write_video(result.frames, os.path.join(folder, f"turntable.{config.render.format}"),
                               config.render.fps))
  if result.mesh is not None:
    written += mesh_lib.export_mesh(result.mesh, os.path.join(folder, f"mesh.{config.mesh.format}"))
  if save_arrays:
    # The one NCHW boundary: planes.npy is [3, C, H, W] like the PyTorch model's.
    planes = result.planes.transpose(0, 3, 1, 2)
    written.append(_atomic(os.path.join(folder, "planes.npy"), lambda p: np.save(p, planes)))
    if result.frames is not None:
      written.append(_atomic(os.path.join(folder, "frames.npy"),
                             lambda p: np.save(p, result.frames.astype(np.float32))))
  return written


def list_images(path: str) -> list[str]:
  """An image file, or the image files of a folder (sorted)."""
  if os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
    if not files:
      raise FileNotFoundError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
    return files
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file or folder")
  return [path]


def output_names(paths: Sequence[str]) -> list[str]:
  """One distinct folder name per input path, in order.

  A file's name without its extension, unless another input has the same stem
  (compared case-insensitively): then ``<stem>_<extension>`` (``obj.png``,
  ``obj.jpg`` -> ``obj_png``, ``obj_jpg``); a name still taken gets ``-2``,
  ``-3``, ...
  """
  split = [os.path.splitext(os.path.basename(os.path.normpath(p))) for p in paths]
  stems = collections.Counter(stem.casefold() for stem, _ in split)
  names, taken = [], set()
  for stem, extension in split:
    name = stem if stems[stem.casefold()] == 1 or not extension else f"{stem}_{extension[1:]}"
    unique, n = name, 2
    while unique.casefold() in taken:
      unique, n = f"{name}-{n}", n + 1
    taken.add(unique.casefold())
    names.append(unique)
  return names


def check_output(output: str) -> None:
  """Fails early when ``output`` cannot become a folder to write into.

  Nothing is created: the first existing folder on the way must be writable.

  Raises:
    NotADirectoryError: ``output`` or a folder above it is a file.
    PermissionError: that folder is not writable.
  """
  path = os.path.abspath(output)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    where = "" if path == os.path.abspath(output) else f" ({path})"
    raise NotADirectoryError(f"output {output}: a file{where} is in the way of the folder")
  if not os.access(path, os.W_OK | os.X_OK):
    raise PermissionError(f"output {output}: cannot write in {path}")


def write_folder(folder: str, write: Callable[[str], T]) -> T:
  """Runs ``write(temp_folder)``, then renames the folder to ``folder``.

  The temporary folder ``.<name>.tmp-<pid>`` sits beside ``folder``; it is
  removed if ``write`` fails, so a failure leaves no folder behind. An
  existing ``folder`` (a previous run's) is replaced once the new one is
  complete.

  Returns:
    What ``write`` returned.
  """
  parent, name = os.path.split(os.path.abspath(folder))
  tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
  old = os.path.join(parent, f".{name}.old-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    result = write(tmp)
    if os.path.isdir(folder) and not os.path.islink(folder):
      shutil.rmtree(old, ignore_errors=True)
      os.rename(folder, old)
      try:
        os.rename(tmp, folder)
      except OSError:
        os.rename(old, folder)  # put the previous folder back
        raise
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, folder)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return result


def _positive(config, fields: Sequence[str], minimum: int = 1) -> None:
  for field in fields:
    section, name = field.split(".")
    value = config[section][name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
      raise ValueError(f"{field} must be a number >= {minimum}, got {value!r}")


def validate_config(config) -> None:
  """Checks the settings before any work, so a bad value is named as such.

  Raises:
    ValueError: the first bad field, by name.
  """
  if config.render.format not in ("mp4", "gif"):
    raise ValueError(f"render.format must be mp4 or gif, got {config.render.format!r}")
  if config.mesh.format not in ("obj", "glb", "ply"):
    raise ValueError(f"mesh.format must be obj, glb or ply, got {config.mesh.format!r}")
  if config.mesh.texture not in ("uv", "vertex"):
    raise ValueError(f"mesh.texture must be uv or vertex, got {config.mesh.texture!r}")
  if config.mesh.texture == "uv" and config.mesh.format == "ply":
    raise ValueError("mesh.texture=uv needs mesh.format glb or obj (PLY has no texture); "
                     "or set mesh.texture=vertex")
  if not 0 <= config.mesh.min_component < 1:
    raise ValueError(f"mesh.min_component must be in [0, 1), got {config.mesh.min_component!r}")
  _positive(config, ["mesh.max_faces"], minimum=0)
  if config.model.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"model.dtype must be float32 or bfloat16, got {config.model.dtype!r}")
  ratio = config.preprocess.foreground_ratio
  if not 0 < ratio <= 1:
    raise ValueError(f"preprocess.foreground_ratio must be in (0, 1], got {ratio!r}")
  _positive(config, ["preprocess.max_side"])
  try:  # resolves rembg now, so a missing package or model file is one line
    preprocess._resolve_matting(config.preprocess.matting)  # pylint: disable=protected-access
  except (RuntimeError, ValueError) as e:
    raise ValueError(f"preprocess.matting: {e}") from e
  if config.render.enabled:
    _positive(config, ["render.num_views", "render.resolution", "render.fps",
                       "render.num_coarse", "render.chunk_size"])
    if config.render.mode not in renderer.MODES:
      raise ValueError(f"render.mode must be one of {', '.join(renderer.MODES)}, "
                       f"got {config.render.mode!r}")
    if config.render.mode == "fast":
      _positive(config, ["render.occupancy_resolution"])
      if not 0 <= config.render.termination < 1:
        raise ValueError(f"render.termination must be in [0, 1), got {config.render.termination!r}")
  if config.mesh.enabled:
    _positive(config, ["mesh.chunk"])
    _positive(config, ["mesh.resolution"], minimum=2)
    block = config.mesh.get("coarse_block", 0)
    if isinstance(block, bool) or not isinstance(block, int) or block == 1 or block < 0:
      raise ValueError(f"mesh.coarse_block must be 0 (off) or an integer >= 2, got {block!r}")
    if config.mesh.texture == "uv":
      _positive(config, ["mesh.texture_size"], minimum=16)


def summary(result: Reconstruction) -> str:
  """One line: the matte, then every stage's seconds (in the order they ran) with
  what the mesh stages made, then the total."""
  t = result.seconds
  parts = []
  for stage in t:
    parts.append(f"{stage} {t[stage]:.2f} s")
    if stage == "mesh" and result.mesh is not None:
      parts[-1] += (f" ({result.mesh_cleanup.describe()})" if result.mesh_cleanup
                    else f" ({len(result.mesh.faces):,} faces)")
    elif stage == "mesh" and result.mesh_error:
      parts[-1] += " (empty surface: no mesh written)"
    elif stage == "texture" and result.mesh is not None and result.mesh.textured:
      side = result.mesh.texture.shape[0]
      parts[-1] += f" ({side}x{side})"
  matte = f"matte {result.matte}, foreground {100 * result.foreground_fraction:.0f}%"
  return matte + "; " + ", ".join(parts) + f"; total {sum(t.values()):.2f} s"


def image_key(config, index: int, deterministic: bool) -> jax.Array | None:
  """The renderer's key for the ``index``-th image of a run (None: deterministic)."""
  return None if deterministic else jax.random.fold_in(jax.random.key(config.seed), index)


def run(config, checkpoint: str, image: str, output: str, deterministic: bool = False,
        save_arrays: bool = False, progress: bool | None = None) -> dict[str, Any]:
  """Reconstructs every image; returns ``{image path: outputs or error}``.

  The config, ``image`` and ``output`` are checked before the checkpoint is
  loaded; an image that fails is reported on stderr and skipped.

  Raises:
    CheckpointError, FileNotFoundError, NotADirectoryError, PermissionError,
    ValueError: before any image is processed.
  """
  validate_config(config)
  with jax.default_matmul_precision(config.get("precision", "highest")):  # float32 is float32
    return _run(config, checkpoint, image, output, deterministic, save_arrays, progress)


def _run(config, checkpoint, image, output, deterministic, save_arrays, progress):
  images = list_images(image)
  check_output(output)
  arch, params = pretrained.load_lrm(checkpoint, pos_resize=config.model.pos_resize)
  reconstructor = Reconstructor(arch, params, config)
  results = {}
  bar = tqdm.tqdm(list(zip(images, output_names(images))), desc="images", unit="image",
                  disable=no_bar(progress))
  for index, (path, name) in enumerate(bar):
    folder = os.path.join(output, name)
    try:
      result = reconstructor(path, image_key(config, index, deterministic), progress)
      written = write_folder(folder, functools.partial(
          save_reconstruction, result, config=config, save_arrays=save_arrays))
      written = [os.path.join(folder, os.path.basename(p)) for p in written]
    except (preprocess.ImageLoadError, preprocess.EmptyForegroundError,
            preprocess.ComplexBackgroundError, ValueError, OSError) as e:
      tqdm.tqdm.write(f"{path}: error: {e}", file=sys.stderr)
      results[path] = {"error": str(e)}
      continue
    if result.matte_warning:
      tqdm.tqdm.write(f"{path}: warning: {result.matte_warning}", file=sys.stderr)
    tqdm.tqdm.write(f"{path} -> {folder}: {summary(result)}", file=sys.stdout)
    results[path] = {"folder": folder, "files": written, "seconds": result.seconds,
                     "mesh_error": result.mesh_error}
  return results
