"""The Grain training loader over multi-view records.

Pipeline, per dataset (a folder of shards, see ``find_shards``): ArrayRecord
source (records tagged with their dataset) -> shuffle(seed) -> repeat; then
the datasets are mixed with their weights, and each element is decoded,
checked, given a source view and ``N`` supervision views, its cameras
normalised so the source camera is the model's canonical one, composited on a
background, resized and cropped; this process' shard (its ``batch_size``
elements of every ``shard_count * batch_size``, so the processes' batches side
by side are one process' batches of the same stream); bad records are dropped;
then batches, built in worker processes.

It is deterministic for a seed and a worker count, and the iterator's state
(``get_state()`` / ``set_state()``) restores it mid-epoch.

A batch is a dict of numpy arrays (``B`` = batch size, ``N`` =
``num_render_views``, ``H`` = ``input_resolution``, ``S`` = ``crop_size``):

=======================  ===================  ===========================================
key                      shape, dtype         meaning
=======================  ===================  ===========================================
``source_image``         [B, H, H, 3] f32     input view in [0, 1] on ``background``
``source_camera``        [B, 16] f32          its camera (``camera_conditioning``):
                                              the canonical pose and its intrinsics
``render_c2w``           [B, N, 4, 4] f32     supervision cameras, same world
``render_intrinsics``    [B, N, 4] f32        normalised intrinsics
``render_rgb``           [B, N, S, S, 3] f32  target crops on ``background``
``render_mask``          [B, N, S, S] f32     target alpha (opacity loss)
``crop``                 [B, N, 3] i32        (start_x, start_y, size) of each crop in the
                                              ``render_resolution`` image
``render_resolution``    [B] i32              side of the full supervision image
``background``           [B, 3] f32           colour to composite renders onto
``scale``                [B] f32              world scale applied by normalisation
``dataset_index``        [B] i32              which mixed dataset the sample is from
=======================  ===================  ===========================================

The renderer supervises crop ``n`` of sample ``b`` with the rays of
``cameras.generate_rays(render_c2w[b, n], render_intrinsics[b, n],
render_resolution[b], crop=tuple(crop[b, n]))`` and composites its colour as
``rgb + (1 - opacity) * background[b]``. With ``include_source_view`` the first
supervision view is the source view itself.

With ``example = "orbit"`` (the video model's loader) an element is instead
the record's orbit (its first ``num_orbit_views`` views, in order) as a clip:

=======================  ===================  ===========================================
``frames``               [B, F, R, R, 3] f32  ``num_frames`` orbit views in [0, 1] on
                                              ``background``, ``R = frame_resolution``
``caption``              [B, 256] u8          UTF-8 caption, zero padded
                                              (:func:`decode_captions`)
``azimuth``              [B, F] f32           radians of each frame
``elevation``            [B] f32              the orbit's elevation, radians
``background``           [B, 3] f32           colour composited onto
``dataset_index``        [B] i32              which mixed dataset the sample is from
=======================  ===================  ===========================================

Frames are taken every ``num_orbit_views / num_frames`` views; with
``random_start`` the clip starts at a random orbit view (an orbit is closed,
so every start is a valid 360-degree clip).

Usage::

  config = pipeline.default_config()
  config.datasets = [{"path": "/data/procedural/1.0.0", "weight": 1.0}]
  dataset = pipeline.make_dataset(config)      # grain.IterDataset
  iterator = iter(dataset)
  batch = next(iterator)
  state = iterator.get_state()                 # store with the checkpoint
  iterator.set_state(state)                    # resume mid-epoch

Multi-worker loading starts processes: call it under
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import collections
import glob
import logging
import os
from typing import Any

import grain
import ml_collections
import numpy as np

from vf3d_jax.data import records
from vf3d_jax.data import views
from vf3d_jax.data import writer
from vf3d_jax.rendering import cameras

_LOG = logging.getLogger(__name__)
# Bad records skipped in this process, by reason.
_BAD_COUNTS: collections.Counter = collections.Counter()


def default_config() -> ml_collections.ConfigDict:
  """Loader settings (embed as ``config.data`` in a training config)."""
  config = ml_collections.ConfigDict()
  # "views": source + supervision views (the LRM); "orbit": orbit clips (video).
  config.example = "views"
  # Datasets to mix: each a dict with `path` (a folder of shards, a glob, or a
  # list of shard files), `weight` (relative sampling weight) and optionally
  # `fraction` (keep the first fraction of its records).
  config.datasets = [{"path": "", "weight": 1.0}]
  config.seed = 0
  config.batch_size = 8
  config.drop_remainder = True
  # Epochs over each dataset; 0 repeats forever.
  config.num_epochs = 0
  # Worker processes (0: in this process) and batches buffered per worker.
  config.num_workers = 2
  config.worker_buffer_size = 2
  # Threads per worker that decode elements.
  config.read_threads = 2
  # Data-parallel sharding; -1 -> jax.process_index() / jax.process_count().
  config.shard_index = -1
  config.shard_count = -1
  # Views: N supervision views; the source may be among them.
  config.num_render_views = 4
  config.include_source_view = True
  # Source drawn from the orbit views only (else from all views).
  config.source_from_orbit = False
  # A fixed source view index (e.g. 0, the first orbit view, as a data engine's
  # first frame); -1 draws it at random as above.
  config.source_view = -1
  # Required view count of a record (0: any count large enough).
  config.expected_views = 0
  # Image sizes.
  config.input_resolution = 512
  config.render_resolution = 256
  config.crop_size = 128
  # Background: "white", or "random" (a random colour with probability
  # random_background_prob, else white), shared by the source and targets.
  config.background = "white"
  config.random_background_prob = 0.5
  # Distance of the canonical source camera; <= 0 keeps each source's own.
  config.canonical_distance = 1.0
  # Orbit clips ("orbit" examples): frames per clip, their side, random start.
  config.num_frames = 16
  config.frame_resolution = 256
  config.random_start = True
  # Bad records: skip with a counted warning, or raise (strict).
  config.strict = False
  # Raise anyway when more than this fraction of a 1000-record window is bad.
  config.max_bad_fraction = 0.5
  return config


def bad_record_counts() -> dict[str, int]:
  """Bad records skipped so far in this process (workers count their own)."""
  return dict(_BAD_COUNTS)


def _report_bad(reason: str, where: str, strict: bool, error: Exception) -> None:
  if strict:
    raise records.BadRecordError(f"bad record {where}: {error}") from error
  _BAD_COUNTS[reason] += 1
  total = sum(_BAD_COUNTS.values())
  if total <= 10 or total & (total - 1) == 0:  # The first ten, then powers of two.
    _LOG.warning("Skipping bad record %s (%s); %d skipped so far in this process",
                 where, error, total)


def find_shards(path) -> list[str]:
  """Shard files of a dataset entry.

  ``path`` is a list of files, a glob, a folder of shards
  (``<data_dir>/<name>/<version>``), a ``<data_dir>/<name>`` folder (its newest
  version) or a ``<data_dir>`` holding exactly one dataset.
  """
  if isinstance(path, (list, tuple)):
    return [str(p) for p in path]
  path = str(path)
  if not os.path.isdir(path):
    return sorted(glob.glob(path))

  def shards_in(folder):
    return sorted(p for p in glob.glob(os.path.join(folder, "*.array_record-*"))
                  if not p.endswith(".incomplete"))

  if found := shards_in(path):
    return found
  for depth in ("*", os.path.join("*", "*")):
    folders = sorted({os.path.dirname(p) for p in
                      glob.glob(os.path.join(path, depth, "*.array_record-*"))})
    if not folders:
      continue
    datasets = {os.path.dirname(f) for f in folders}
    if len(datasets) > 1:
      raise ValueError(f"{path} holds several datasets ({sorted(datasets)}); name one")
    version = lambda f: tuple(int(x) if x.isdigit() else -1 for x in os.path.basename(f).split("."))
    return shards_in(max(folders, key=version))
  return []


def _usable_shards(paths: list[str], strict: bool) -> list[str]:
  """Drops shards that cannot be opened or hold nothing (a truncated file)."""
  usable = []
  for path in paths:
    try:
      if writer.count_records(path) <= 0:
        raise records.BadRecordError("no readable records (truncated or empty file)")
      usable.append(path)
    except Exception as error:  # pylint: disable=broad-except
      _report_bad("shard", path, strict, error)
  return usable


class _Tag:
  """``(record index, bytes) -> (dataset index, record index, bytes)``."""

  def __init__(self, dataset_index: int):
    self.dataset_index = dataset_index

  def __call__(self, index: int, serialized: bytes):
    return self.dataset_index, index, serialized


def _is_example(element) -> bool:
  return element is not None


class _ExampleMaker:
  """A tagged serialized record -> ``self._make(...)``, or None for a bad record."""

  strict: bool = False

  def __call__(self, element, rng: np.random.Generator) -> dict[str, Any] | None:
    dataset_index, record_index, serialized = element
    try:
      return self._make(dataset_index, serialized, rng)
    except records.BadRecordError as error:
      _report_bad("record", f"{record_index} of dataset {dataset_index}", self.strict, error)
      return None

  def _make(self, dataset_index, serialized, rng):
    raise NotImplementedError


class MakeExample(_ExampleMaker):
  """Turns a tagged serialized record into a training example (or None)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.num_render_views = int(config.num_render_views)
    self.include_source_view = bool(config.include_source_view)
    self.source_from_orbit = bool(config.source_from_orbit)
    self.source_view = int(config.source_view)
    self.expected_views = int(config.expected_views)
    self.input_resolution = int(config.input_resolution)
    self.render_resolution = int(config.render_resolution)
    self.crop_size = int(config.crop_size)
    self.background = str(config.background)
    self.random_background_prob = float(config.random_background_prob)
    distance = config.canonical_distance
    self.canonical_distance = None if distance is None or distance <= 0 else float(distance)
    self.strict = bool(config.strict)
    if self.background not in ("white", "random"):
      raise ValueError(f"background must be 'white' or 'random', got {self.background!r}")
    if self.crop_size > self.render_resolution:
      raise ValueError("crop_size must not exceed render_resolution")


  def _make(self, dataset_index, serialized, rng):
    needed = self.num_render_views + (0 if self.include_source_view else 1)
    record = records.parse(serialized, min_views=needed)
    if self.expected_views and record.num_views != self.expected_views:
      raise records.BadRecordError(
          f"{record.num_views} views, expected {self.expected_views}")
    candidates = record.num_orbit_views if self.source_from_orbit else None
    source, render = views.select_views(rng, record.num_views, self.num_render_views,
                                        self.include_source_view, candidates, self.source_view)
    background = np.ones(3, np.float32)
    if self.background == "random" and rng.uniform() < self.random_background_prob:
      background = rng.uniform(size=3).astype(np.float32)
    c2w, _, scale = views.canonicalize_cameras(record.c2w, source, self.canonical_distance)
    source_rgb, _ = views.composite(records.decode_png(record.images[source]), background)
    render_rgb, render_mask, crops = [], [], []
    for index in render:
      rgba = records.decode_png(record.images[index])
      x, y, size = crop = views.crop_box(rng, self.render_resolution, self.crop_size)
      stored = rgba.shape[0]
      if rgba.shape[1] == stored and stored % self.render_resolution == 0:
        # Integer shrink: only the crop's pixels need compositing and averaging.
        factor = stored // self.render_resolution
        rgb, alpha = views.composite(
            rgba[y * factor:(y + size) * factor, x * factor:(x + size) * factor], background)
        rgb, alpha = views.box_downsample(rgb, factor), views.box_downsample(alpha, factor)
      else:
        rgb, alpha = views.composite(rgba, background)
        rgb = views.resize(rgb, self.render_resolution)[y:y + size, x:x + size]
        alpha = views.resize(alpha, self.render_resolution)[y:y + size, x:x + size]
      render_rgb.append(rgb)
      render_mask.append(alpha)
      crops.append(crop)
    return {
        "source_image": views.resize(source_rgb, self.input_resolution),
        "source_camera": cameras.camera_conditioning(
            c2w[source], record.intrinsics[source], xp=np).astype(np.float32),
        "render_c2w": c2w[render],
        "render_intrinsics": record.intrinsics[render].astype(np.float32),
        "render_rgb": np.stack(render_rgb).astype(np.float32),
        "render_mask": np.stack(render_mask).astype(np.float32),
        "crop": np.stack(crops).astype(np.int32),
        "render_resolution": np.int32(self.render_resolution),
        "background": background,
        "scale": np.float32(scale),
        "dataset_index": np.int32(dataset_index),
    }


CAPTION_BYTES = 256


def encode_caption(caption: str) -> np.ndarray:
  """``[CAPTION_BYTES]`` uint8: UTF-8, cut at a character boundary, zero padded."""
  data = caption.encode("utf-8")[:CAPTION_BYTES].decode("utf-8", "ignore").encode("utf-8")
  out = np.zeros(CAPTION_BYTES, np.uint8)
  out[:len(data)] = np.frombuffer(data, np.uint8)
  return out


def decode_captions(captions: np.ndarray) -> list[str]:
  """``[B, CAPTION_BYTES]`` uint8 -> captions."""
  return [bytes(row).rstrip(b"\0").decode("utf-8") for row in np.asarray(captions, np.uint8)]


class MakeOrbitExample(_ExampleMaker):
  """Turns a tagged serialized record into an orbit clip (or None)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.num_frames = int(config.num_frames)
    self.frame_resolution = int(config.frame_resolution)
    self.random_start = bool(config.random_start)
    self.background = str(config.background)
    self.random_background_prob = float(config.random_background_prob)
    self.strict = bool(config.strict)
    if self.background not in ("white", "random"):
      raise ValueError(f"background must be 'white' or 'random', got {self.background!r}")
    if self.num_frames < 1 or self.frame_resolution < 1:
      raise ValueError("num_frames and frame_resolution must be positive")


  def _make(self, dataset_index, serialized, rng):
    record = records.parse(serialized, min_views=self.num_frames)
    orbit = record.num_orbit_views
    if orbit < self.num_frames or orbit % self.num_frames:
      raise records.BadRecordError(
          f"{orbit} orbit views cannot give {self.num_frames} evenly spaced frames")
    stride = orbit // self.num_frames
    start = int(rng.integers(orbit)) if self.random_start else 0
    indices = (start + stride * np.arange(self.num_frames)) % orbit
    background = np.ones(3, np.float32)
    if self.background == "random" and rng.uniform() < self.random_background_prob:
      background = rng.uniform(size=3).astype(np.float32)
    frames = [views.resize(views.composite(records.decode_png(record.images[i]), background)[0],
                           self.frame_resolution) for i in indices]
    elevation = record.elevation_estimate
    if not np.isfinite(elevation):
      elevation = float(np.mean(record.elevation[:orbit]))
    return {
        "frames": np.stack(frames).astype(np.float32),
        "caption": encode_caption(record.caption),
        "azimuth": record.azimuth[indices].astype(np.float32),
        "elevation": np.float32(elevation),
        "background": background,
        "dataset_index": np.int32(dataset_index),
    }


_EXAMPLES = {"views": MakeExample, "orbit": MakeOrbitExample}


def _shard_options(config) -> tuple[int, int]:
  index, count = int(config.shard_index), int(config.shard_count)
  if index < 0 or count < 0:
    import jax  # pylint: disable=g-import-not-at-top
    index, count = jax.process_index(), jax.process_count()
  if not 0 <= index < count:
    raise ValueError(f"shard_index {index} not in [0, {count})")
  return index, count


def make_map_dataset(config: ml_collections.ConfigDict) -> grain.MapDataset:
  """The per-element part of the pipeline (examples, ``None`` for bad ones)."""
  shard_index, shard_count = _shard_options(config)
  parts, weights = [], []
  for dataset_index, entry in enumerate(config.datasets):
    entry = dict(entry)
    paths = find_shards(entry["path"])
    if not paths:
      raise FileNotFoundError(f"no ArrayRecord shards at {entry['path']!r}")
    paths = _usable_shards(paths, bool(config.strict))
    if not paths:
      raise records.BadRecordError(f"no usable shards at {entry['path']!r}")
    dataset = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths))
    fraction = float(entry.get("fraction", 1.0))
    if fraction < 1.0:  # the first records only (same subset for every seed)
      dataset = dataset[:max(1, int(round(fraction * len(dataset))))]
    dataset = dataset.map_with_index(_Tag(dataset_index))
    dataset = dataset.shuffle(seed=int(config.seed) * 1009 + dataset_index)
    dataset = dataset.repeat(int(config.num_epochs) or None)
    parts.append(dataset)
    weights.append(float(entry.get("weight", 1.0)))
  mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
  if config.example not in _EXAMPLES:
    raise ValueError(f"example must be one of {sorted(_EXAMPLES)}, got {config.example!r}")
  make = _EXAMPLES[config.example](config)
  dataset = mixed.random_map(make, seed=int(config.seed))  # randomness by global index
  if shard_count > 1:
    dataset = _BlockShard(dataset, int(config.batch_size), shard_index, shard_count)
  return dataset.filter(_is_example)


class _BlockShard(grain.MapDataset):
  """Process ``index`` of ``count``: its ``block`` elements of every ``count * block``."""

  def __init__(self, parent: grain.MapDataset, block: int, index: int, count: int):
    super().__init__(parent)
    self._block, self._index, self._count = block, index, count
    rounds, rest = divmod(len(parent), block * count)
    self._length = rounds * block + min(max(rest - index * block, 0), block)

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    rounds, offset = divmod(index, self._block)
    return self._parent[(rounds * self._count + self._index) * self._block + offset]


def make_dataset(config: ml_collections.ConfigDict) -> grain.IterDataset:
  """The batched loader: iterate it; its iterators save and restore state."""
  dataset = make_map_dataset(config).to_iter_dataset(
      grain.ReadOptions(num_threads=int(config.read_threads),
                        prefetch_buffer_size=max(2 * int(config.batch_size), 8)))
  # Filtering never spins forever: too many bad records in a window raise.
  dataset = grain.experimental.WithOptionsIterDataset(
      dataset, grain.experimental.DatasetOptions(
          filter_raise_threshold_ratio=float(config.max_bad_fraction)))
  dataset = dataset.batch(int(config.batch_size), drop_remainder=bool(config.drop_remainder))
  if int(config.num_workers) > 0:
    # Grain's workers read absl flags; outside absl.app (tests, notebooks) the
    # flags were never parsed, and their defaults are what we want.
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(config.num_workers),
        per_worker_buffer_size=int(config.worker_buffer_size)))
  return dataset
