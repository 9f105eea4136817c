r"""The data engine: prompts -> filtered, elevation-annotated synthetic multi-view records.

``python -m vf3d_jax.data_engine`` (``vf3d_jax/data_engine.py``) calls :func:`run`.

Stages, in order (each also runs alone with ``--stage``):

1. ``prompts``: from a ``.txt`` (a prompt a line) or ``.jsonl`` (``{"prompt":
   ...}`` rows) file, or the captions of seeded procedural assets.
   Whitespace-normalised duplicates are dropped (first kept); each prompt gets
   the stable id ``p-<first 12 hex digits of SHA-1(prompt)>``. Prompts are cut
   into work shards of ``shard_size``, in order.
2. ``frames``: a first frame per prompt: text -> image with the image UNet
   (EMU Video's factorisation; ``frames.model``), the user's images, or (toy)
   the true first view of a procedural prompt's asset.
3. ``videos``: first frame + prompt -> an orbit clip of the video model's
   frame count, ``video.batch_size`` at a time. Shard ``s`` samples with the
   key ``fold_in(key(seed), s)``: one seed per shard of prompts, so the result
   depends on neither the batch size within it nor the number of processes.
4. ``features``: per video, the extractor's features of every frame
   (``features.extractor``, see ``vf3d_jax/engine/features.py``); kept as the
   first frame's (elevation) and the frame mean (quality).
5. ``labels`` (procedural prompts with ``labels.source="auto"``): the
   automatic labeller, a stand-in for the paper's 2,000 hand labels: it renders
   the prompt's true orbit and scores the mean silhouette IoU of the video's
   frames 1..F-1 against the true frames (the video model's own consistency
   score, ``video_trainer``); the filter stage calls a video good when that
   reaches ``labels.min_iou``. Silhouettes cannot see a round object turn
   about its axis.
6. ``filter``: an RBF SVM on the mean features, fitted on the labelled videos
   (``labels.source``: a labels file, or the automatic labels), with its
   cross-validated accuracy; every video gets its decision value as score.
7. ``elevation``: an MLP on first-frame features, fitted on the first orbit
   views of 3D records with known elevations (``elevation.train``), with its
   error on held-out records.
8. ``records``: each video scoring at least ``filter.threshold`` becomes an
   orbit record: ``source="synthetic"``, its quality score and estimated
   elevation, cameras at ``F`` evenly spaced azimuths (view 0 at azimuth 0,
   as the 3D orbits) at that elevation, at ``records.radius`` and
   ``records.fov_degrees`` (the 3D renders' cameras), frames as RGBA PNGs with
   a matte (``records.matting``). One record shard per work shard.
9. ``index``: lists the record shards that exist and writes TFDS metadata, so
   ``train_lrm --config.data.train=<workdir>/records:1,<3d>:0.2`` reads them.
10. ``report``: a contact sheet of kept and rejected videos with their scores,
    and histograms of scores and elevations.

Work shard ``s`` of every per-shard stage (frames, videos, features, labels,
records) belongs to process ``s mod process_count``; its output is one file
written atomically, which any process skips when it exists. A crash or kill
loses at most the shards in progress; adding processes (with a shared
workdir) never redoes a finished shard. The fits (filter, elevation) and the
index and report run on process 0, between barriers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from PIL import Image

from vf3d_jax.data import orbits
from vf3d_jax.data import pipeline as data_pipeline
from vf3d_jax.data import records
from vf3d_jax.data import render_orbits
from vf3d_jax.data import raytrace
from vf3d_jax.data import procedural
from vf3d_jax.data import writer as writer_lib
from vf3d_jax.inference import preprocess

_LOG = logging.getLogger(__name__)

STAGES = ("prompts", "frames", "videos", "features", "labels", "filter", "elevation", "records",
          "index", "report")
SHARD_STAGES = ("frames", "videos", "features", "labels", "records")
PROMPTS = "prompts.jsonl"


# --------------------------------------------------------------------------
# Files.

def _atomic_bytes(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def save_npz(path: str, **arrays) -> None:
  """Writes an ``.npz`` atomically (a kill leaves the old file or none)."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  _atomic_bytes(path, buffer.getvalue())


def load_npz(path: str) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def save_json(path: str, content: Any) -> None:
  _atomic_bytes(path, (json.dumps(content, indent=1, default=str) + "\n").encode())


def file_digest(path: str) -> str:
  """SHA-256 of a file, or of a folder's files (names, sizes and contents), 16 hex digits."""
  digest = hashlib.sha256()
  paths = [path] if os.path.isfile(path) else sorted(
      os.path.join(root, f) for root, _, files in os.walk(path) for f in files)
  for p in paths:
    digest.update(os.path.relpath(p, path).encode())
    with open(p, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
  return digest.hexdigest()[:16]


class Workdir:
  """Where every stage's outputs live."""

  def __init__(self, root: str):
    self.root = root

  def path(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  def shard(self, stage: str, shard: int, ext: str = "npz") -> str:
    return self.path("shards", stage, f"{stage}-{shard:05d}.{ext}")

  def records_dir(self, name: str) -> str:
    return self.path("records", name, "1.0.0")

  def record_shard(self, name: str, shard: int, count: int) -> str:
    # The layout and shard naming of the record writer (find_shards and TFDS read it).
    return os.path.join(self.records_dir(name), f"{name}-train.array_record-{shard:05d}-of-{count:05d}")


# --------------------------------------------------------------------------
# Stage 1: prompts.

def normalize_prompt(prompt: str) -> str:
  return re.sub(r"\s+", " ", prompt).strip()


def prompt_id(prompt: str) -> str:
  return "p-" + hashlib.sha1(normalize_prompt(prompt).encode()).hexdigest()[:12]


def read_prompt_file(path: str) -> list[str]:
  """Prompts of a ``.txt`` (a line each) or ``.jsonl`` (``{"prompt": ...}``) file.

  Raises:
    FileNotFoundError: no such file.
    ValueError: a ``.jsonl`` line without a string ``prompt`` (file and line named).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"prompts.file {path}: no such file")
  prompts = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      if path.endswith(".jsonl"):
        try:
          prompt = json.loads(line)["prompt"]
          if not isinstance(prompt, str):
            raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
          raise ValueError(f"{path} line {number}: want {{\"prompt\": text}}") from None
      else:
        prompt = line
      prompts.append(prompt)
  return prompts


def make_prompts(config) -> list[dict[str, Any]]:
  """The deduplicated prompt rows: ``{"id", "prompt"}`` (+ ``"asset"`` for procedural ones)."""
  p = config.prompts
  rows, seen = [], set()
  if p.source == "procedural":
    render_orbits.validate_config(p.procedural)
    candidates = [(render_orbits.procedural_asset(p.procedural, i).caption, i)
                  for i in range(int(p.procedural.num_assets))]
  elif p.source == "file":
    candidates = [(prompt, None) for prompt in read_prompt_file(str(p.file))]
  else:
    raise ValueError(f"prompts.source must be 'file' or 'procedural', got {p.source!r}")
  for prompt, asset in candidates:
    prompt = normalize_prompt(prompt)
    if not prompt or prompt.casefold() in seen:
      continue
    seen.add(prompt.casefold())
    row = {"id": prompt_id(prompt), "prompt": prompt}
    if asset is not None:
      row["asset"] = asset
    rows.append(row)
    if p.max_prompts and len(rows) >= p.max_prompts:
      break
  if not rows:
    raise ValueError("no prompts: the prompt source is empty")
  return rows


def read_prompts(work: Workdir) -> list[dict[str, Any]]:
  path = work.path(PROMPTS)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: run the prompts stage first")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def num_shards(prompts: Sequence[Any], shard_size: int) -> int:
  return max(1, math.ceil(len(prompts) / shard_size))


def shard_prompts(prompts: Sequence[dict], shard: int, shard_size: int) -> list[dict]:
  return list(prompts[shard * shard_size:(shard + 1) * shard_size])


def my_shards(count: int, process_index: int, process_count: int) -> list[int]:
  """The work shards of one process: every ``process_count``-th from its index."""
  return list(range(process_index, count, process_count))


# --------------------------------------------------------------------------
# Models, loaded once per run.

@dataclasses.dataclass
class Models:
  """What the shard stages need, built lazily."""

  config: Any
  _cache: dict = dataclasses.field(default_factory=dict)

  def get(self, name: str, build: Callable[[], Any]):
    if name not in self._cache:
      self._cache[name] = build()
    return self._cache[name]

  def video(self):
    from vf3d_jax.video import model as model_lib  # pylint: disable=g-import-not-at-top
    from vf3d_jax.video import sampling  # pylint: disable=g-import-not-at-top

    def build():
      directory = sampling.resolve_model_path(str(self.config.video.model))
      model, params = model_lib.load_export(directory)
      return directory, model, params, model.load_encoders()
    return self.get("video", build)

  def image(self):
    from vf3d_jax.video import model as model_lib  # pylint: disable=g-import-not-at-top
    from vf3d_jax.video import sampling  # pylint: disable=g-import-not-at-top

    def build():
      directory = sampling.resolve_model_path(str(self.config.frames.model))
      model, params = model_lib.load_export(directory)
      single = model_lib.VideoModel(dataclasses.replace(model.spec, num_frames=1))
      return directory, single, params, single.load_encoders()
    return self.get("image", build)

  def extractor(self):
    from vf3d_jax.engine import features  # pylint: disable=g-import-not-at-top
    x = self.config.features
    return self.get("extractor", lambda: features.make_extractor(
        str(x.extractor), input_size=int(x.input_size), batch_size=int(x.batch_size)))


def sample_options(config):
  from vf3d_jax.video import sampling  # pylint: disable=g-import-not-at-top
  v = config.video
  return sampling.SampleOptions(sampler=v.sampler, num_steps=int(v.num_steps), eta=float(v.eta),
                                image_scale=float(v.image_scale), text_scale=float(v.text_scale),
                                guidance_rescale=float(v.guidance_rescale),
                                replace_first_frame=bool(v.replace_first_frame))


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
  """``[N, H, W, 3]`` uint8 -> ``[N, size, size, 3]`` uint8 (PIL bicubic)."""
  if frames.shape[1] == size and frames.shape[2] == size:
    return frames
  return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.BICUBIC))
                   for f in frames])


# --------------------------------------------------------------------------
# Procedural truth (the toy setting's first frames and the automatic labeller).

def true_orbits(config, assets: Sequence[int]) -> np.ndarray:
  """``[B, V, R, R, 4]`` uint8 orbit renders of procedural assets, as ``render_orbits`` makes them."""
  c = config.prompts.procedural
  out = []
  batch = int(c.batch_size)
  for start in range(0, len(assets), batch):
    part = list(assets[start:start + batch])
    rendered, _ = render_orbits._render_procedural(c, part)  # pylint: disable=protected-access
    out += [rgba for _, _, rgba, _ in rendered]
  return np.stack(out)


def _on_white(rgba: np.ndarray) -> np.ndarray:
  rgba = rgba.astype(np.float32) / 255.0
  return rgba[..., :3] * rgba[..., 3:] + 1.0 - rgba[..., 3:]


# --------------------------------------------------------------------------
# Shard stages.

def _needed(path: str, stage: str) -> str:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: run the {stage} stage first")
  return path


def stage_frames(config, models: Models, rows: list[dict], shard: int) -> dict[str, np.ndarray]:
  f = config.frames
  video_dir, video_model, _, _ = models.video()
  size = video_model.spec.resolution
  if f.source == "procedural":
    if any("asset" not in r for r in rows):
      raise ValueError("frames.source='procedural' needs procedural prompts")
    frames = _to_uint8(_on_white(true_orbits(config, [r["asset"] for r in rows])[:, 0]))
  elif f.source == "images":
    frames = np.stack([_to_uint8(_user_image(str(f.images), r, size)) for r in rows])
  elif f.source == "model":
    from vf3d_jax.video import sampling  # pylint: disable=g-import-not-at-top
    _, image_model, params, encoders = models.image()
    clips = sampling.sample_clips(image_model, params, encoders, [r["prompt"] for r in rows],
                                  jax.random.fold_in(jax.random.key(int(config.seed) + 1), shard),
                                  options=dataclasses.replace(sample_options(config),
                                                              replace_first_frame=False))
    frames = _to_uint8(clips[:, 0])
  else:
    raise ValueError(f"frames.source must be model, images or procedural, got {f.source!r}")
  del video_dir
  return {"frames": _resize_frames(frames, size)}


def _user_image(folder: str, row: dict, size: int) -> np.ndarray:
  from vf3d_jax.video import sampling  # pylint: disable=g-import-not-at-top
  for ext in (".png", ".jpg", ".jpeg", ".webp"):
    path = os.path.join(folder, row["id"] + ext)
    if os.path.isfile(path):
      return sampling.first_frame(path, size, 0.0)
  raise FileNotFoundError(f"frames.images {folder}: no image for prompt {row['id']} "
                          f"({row['prompt']!r}); name it {row['id']}.png")


def stage_videos(config, models: Models, rows: list[dict], shard: int,
                 work: Workdir) -> dict[str, np.ndarray]:
  from vf3d_jax.video import sampling  # pylint: disable=g-import-not-at-top
  _, model, params, encoders = models.video()
  frames = load_npz(_needed(work.shard("frames", shard), "frames"))["frames"]
  frames = frames.astype(np.float32) / 255.0
  key = jax.random.fold_in(jax.random.key(int(config.seed)), shard)
  clips = []
  batch = int(config.video.batch_size)
  for start in range(0, len(rows), batch):
    part = rows[start:start + batch]
    # Pad a short last batch so one compiled sampler serves the shard; the padding is dropped.
    pad = batch - len(part)
    prompts = [r["prompt"] for r in part] + [part[-1]["prompt"]] * pad
    first = np.concatenate([frames[start:start + len(part)],
                            np.repeat(frames[start + len(part) - 1:start + len(part)], pad, 0)])
    out = sampling.sample_clips(model, params, encoders, prompts, jax.random.fold_in(key, start),
                                first_frames=first, options=sample_options(config))
    clips.append(out[:len(part)])
  return {"videos": _to_uint8(np.concatenate(clips))}


def stage_features(config, models: Models, rows: list[dict], shard: int,
                   work: Workdir) -> dict[str, np.ndarray]:
  from vf3d_jax.engine import features  # pylint: disable=g-import-not-at-top
  videos = load_npz(_needed(work.shard("videos", shard), "videos"))["videos"]
  per_frame = features.video_features(models.extractor(), videos)
  pooled = features.pool_frames(per_frame)
  return {"first": np.asarray(pooled.first, np.float32), "mean": np.asarray(pooled.mean, np.float32)}


def stage_labels(config, models: Models, rows: list[dict], shard: int,
                 work: Workdir) -> dict[str, np.ndarray]:
  from vf3d_jax.training import video_trainer  # pylint: disable=g-import-not-at-top
  if any("asset" not in r for r in rows):
    raise ValueError("labels.source='auto' needs procedural prompts (their true orbits)")
  videos = load_npz(work.shard("videos", shard))["videos"].astype(np.float32) / 255.0
  truth = _on_white(true_orbits(config, [r["asset"] for r in rows]))
  frames = videos.shape[1]
  if truth.shape[1] < frames:
    raise ValueError(f"the procedural prompts' orbits have {truth.shape[1]} views; the video "
                     f"model makes {frames} frames")
  truth = np.stack([_resize_float(t[:frames], videos.shape[2]) for t in truth])
  pred_sil = video_trainer.silhouette(videos[:, 1:])
  true_sil = video_trainer.silhouette(truth[:, 1:])
  inter = np.sum(pred_sil & true_sil, axis=(2, 3))
  union = np.sum(pred_sil | true_sil, axis=(2, 3))
  iou = np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0), axis=1)
  return {"iou": iou.astype(np.float32), "good": iou >= float(config.labels.min_iou)}


def _resize_float(frames: np.ndarray, size: int) -> np.ndarray:
  return _resize_frames(_to_uint8(frames), size).astype(np.float32) / 255.0


def synthetic_cameras(config, num_views: int, elevation: float) -> dict[str, np.ndarray]:
  """Cameras of a synthetic orbit: ``num_views`` azimuths from 0 at one elevation."""
  r = config.records
  distance = float(r.radius) if r.radius > 0 else orbits.fit_distance(float(r.fov_degrees))
  azimuth = 2 * math.pi * np.arange(num_views) / num_views
  elevations = np.full(num_views, elevation)
  c2w, intrinsics = orbits.cameras_from_angles(azimuth, elevations, distance, float(r.fov_degrees))
  return {"c2w": c2w, "intrinsics": intrinsics, "azimuth": azimuth.astype(np.float32),
          "elevation": elevations.astype(np.float32)}


def video_record(config, row: dict, video: np.ndarray, score: float, elevation: float) -> bytes:
  """One kept video as a synthetic orbit record (see the module docstring, stage 8)."""
  frames = video.astype(np.float32) / 255.0
  images = []
  for frame in frames:
    alpha = preprocess.remove_background(frame) if config.records.matting == "builtin" else \
        np.ones(frame.shape[:2], np.float32)
    images.append(records.encode_png(np.concatenate([frame, alpha[..., None]], -1)))
  views = synthetic_cameras(config, len(frames), elevation)
  return records.serialize(records.MultiViewRecord(
      asset_id=row["id"], caption=row["prompt"], source="synthetic", images=images,
      c2w=views["c2w"], intrinsics=views["intrinsics"], azimuth=views["azimuth"],
      elevation=views["elevation"], num_orbit_views=len(frames), quality=float(score),
      elevation_estimate=float(elevation)))


def stage_records(config, models: Models, rows: list[dict], shard: int, work: Workdir,
                  count: int) -> dict[str, np.ndarray]:
  from vf3d_jax.engine import elevation as elevation_lib  # pylint: disable=g-import-not-at-top
  from vf3d_jax.engine import quality  # pylint: disable=g-import-not-at-top
  for needed, stage in ((filter_path(work), "filter"),
                        (work.path("elevation"), "elevation"),
                        (work.shard("features", shard), "features")):
    if not os.path.exists(needed):
      raise FileNotFoundError(f"{needed}: run the {stage} stage first")
  feats = load_npz(work.shard("features", shard))
  videos = load_npz(work.shard("videos", shard))["videos"]
  quality_filter = models.get("filter", lambda: quality.QualityFilter.load(filter_path(work)))
  estimator = models.get("elevation", lambda: elevation_lib.ElevationEstimator.load(
      work.path("elevation")))
  scores = np.asarray(quality_filter.score(feats["mean"]), np.float32)
  elevations = np.asarray(estimator.predict(feats["first"]), np.float32)
  keep = scores >= float(config.filter.threshold)
  path = work.record_shard(str(config.records.name), shard, count)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".incomplete"
  sink = writer_lib._ArrayRecordFileWriter(tmp)  # pylint: disable=protected-access
  try:
    for row, video, score, elevation, kept in zip(rows, videos, scores, elevations, keep):
      if kept:
        sink.write(video_record(config, row, video, score, elevation))
  finally:
    sink.close()
  if keep.any():
    os.replace(tmp, path)
  else:
    os.remove(tmp)  # ArrayRecord files hold at least one record
  return {"score": scores, "elevation": elevations, "keep": keep}


# --------------------------------------------------------------------------
# Global stages.

def filter_path(work: Workdir) -> str:
  return work.path("filter", "svm.joblib")


def fit_filter(config, work: Workdir, prompts: list[dict], count: int) -> dict[str, Any]:
  from vf3d_jax.engine import quality  # pylint: disable=g-import-not-at-top
  ids, feats = [], []
  for shard in range(count):
    rows = shard_prompts(prompts, shard, int(config.shard_size))
    ids += [r["id"] for r in rows]
    feats.append(load_npz(work.shard("features", shard))["mean"])
  feats = np.concatenate(feats)
  if config.labels.source == "auto":
    labels = {}
    for shard in range(count):
      rows = shard_prompts(prompts, shard, int(config.shard_size))
      iou = load_npz(work.shard("labels", shard))["iou"]
      labels.update({r["id"]: bool(v >= float(config.labels.min_iou)) for r, v in zip(rows, iou)})
  else:
    labels = quality.read_labels(str(config.labels.source))
  index = {vid: i for i, vid in enumerate(ids)}
  known = [vid for vid in labels if vid in index]
  if not known:
    raise ValueError(f"labels {config.labels.source}: none of its ids are videos of this run")
  x = feats[[index[v] for v in known]]
  y = np.array([labels[v] for v in known], bool)
  if y.all() or not y.any():
    raise ValueError(f"labels: all {len(y)} labelled videos are {'good' if y[0] else 'bad'}; "
                     "the filter needs both kinds (auto labels: change labels.min_iou)")
  quality_filter = quality.QualityFilter(C=float(config.filter.C), seed=int(config.seed))
  report = quality_filter.fit(x, y, cv_folds=int(config.filter.folds))
  quality_filter.save(filter_path(work))
  scores = np.asarray(quality_filter.score(feats))
  report.update(labelled=len(known), videos=len(ids),
                kept=int(np.sum(scores >= float(config.filter.threshold))),
                threshold=float(config.filter.threshold))
  return report


def elevation_training_set(config, extractor, size: int) -> tuple[np.ndarray, np.ndarray]:
  """First-view features of 3D orbit records (at the videos' frame size) and their elevations.

  Raises:
    FileNotFoundError: ``elevation.train`` names no records.
  """
  import grain  # pylint: disable=g-import-not-at-top
  e = config.elevation
  shards = data_pipeline.find_shards(str(e.train)) if e.train else []
  if not shards:
    raise FileNotFoundError(f"elevation.train {e.train!r}: no 3D orbit records (the video "
                            "model's tuning data, with known elevations)")
  source = grain.sources.ArrayRecordDataSource(shards)
  count = min(len(source), int(e.max_records)) if e.max_records else len(source)
  frames, elevations = [], []
  for i in range(count):
    record = records.parse(source[i])
    elevation = record.elevation_estimate
    if math.isnan(elevation):
      elevation = float(record.elevation[0])
    frames.append(_to_uint8(_on_white(records.decode_png(record.images[0]))))
    elevations.append(elevation)
  feats = np.asarray(extractor(_resize_frames(np.stack(frames), size)), np.float32)
  return feats, np.asarray(elevations, np.float32)


def fit_elevation(config, models: Models, work: Workdir | None) -> dict[str, Any]:
  """Fits the elevation MLP (saved in the workdir when given); returns its report."""
  from vf3d_jax.engine import elevation as elevation_lib  # pylint: disable=g-import-not-at-top
  e = config.elevation
  feats, elevations = elevation_training_set(config, models.extractor(),
                                             models.video()[1].spec.resolution)
  estimator = elevation_lib.ElevationEstimator()
  report = estimator.fit(feats, elevations, hidden=int(e.hidden), steps=int(e.steps),
                         lr=float(e.lr), weight_decay=float(e.weight_decay),
                         seed=int(config.seed), val_fraction=float(e.val_fraction))
  if work is not None:
    estimator.save(work.path("elevation"))
  report["train_records"] = str(e.train)
  return report


def write_index(config, work: Workdir, count: int) -> dict[str, Any]:
  """Lists the record shards that exist (``index.json``); TFDS metadata when every shard does.

  A shard whose videos were all rejected has no file (ArrayRecord files are never empty).
  """
  name = str(config.records.name)
  directory = work.records_dir(name)
  shards, lengths = [], []
  for shard in range(count):
    path = work.record_shard(name, shard, count)
    if os.path.isfile(path):
      shards.append(os.path.basename(path))
      lengths.append(writer_lib.count_records(path))
  index = {"name": name, "directory": directory, "shards": shards, "records": int(sum(lengths)),
           "shard_lengths": lengths, "work_shards": count}
  if shards:
    save_json(os.path.join(directory, "index.json"), index)
  if shards and len(shards) == count:
    num_bytes = sum(os.path.getsize(os.path.join(directory, s)) for s in shards)
    writer_lib.write_tfds_metadata(directory, "train", lengths, num_bytes,
                                   "Synthetic multi-view orbits from the vf3d_jax data engine.")
  return index


# --------------------------------------------------------------------------
# Report.

def _histogram(values: np.ndarray, title: str, width: int = 320, height: int = 160,
               bins: int = 20, marker: float | None = None) -> np.ndarray:
  """A bar chart of ``values`` as an ``[H, W, 3]`` uint8 image (title, axis range, optional marker)."""
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
  image = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(image)
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  draw.text((4, 2), f"{title} (n={len(values)})", fill=(0, 0, 0))
  if len(values):
    low, high = float(values.min()), float(values.max())
    if marker is not None:
      low, high = min(low, marker), max(high, marker)
    high = high if high > low else low + 1.0
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    top, bottom, left, right = 18, height - 16, 4, width - 4
    scale = (bottom - top) / max(1, counts.max())
    bar = (right - left) / bins
    for i, n in enumerate(counts):
      x0 = left + i * bar
      draw.rectangle([x0 + 1, bottom - n * scale, x0 + bar - 1, bottom], fill=(70, 110, 190))
    if marker is not None:
      x = left + (marker - low) / (high - low) * (right - left)
      draw.line([x, top, x, bottom], fill=(200, 40, 40), width=2)
    draw.text((left, bottom + 2), f"{low:.3g}", fill=(0, 0, 0))
    draw.text((right - 40, bottom + 2), f"{high:.3g}", fill=(0, 0, 0))
  return np.asarray(image)


def write_report(config, work: Workdir, prompts: list[dict], count: int) -> dict[str, Any]:
  """``report/sheet.png`` (kept and rejected videos with scores) and ``report/histograms.png``."""
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
  size = int(config.shard_size)
  scores, elevations, keep, ids = [], [], [], []
  for shard in range(count):
    out = load_npz(work.shard("records", shard))
    scores.append(out["score"])
    elevations.append(out["elevation"])
    keep.append(out["keep"])
    ids += [(shard, i) for i in range(len(out["score"]))]
  scores, elevations, keep = map(np.concatenate, (scores, elevations, keep))
  order = np.argsort(-scores)
  kept = [i for i in order if keep[i]][:int(config.report.sheet_videos)]
  rejected = [i for i in order[::-1] if not keep[i]][:int(config.report.sheet_videos)]
  cell, frames_shown = 64, int(config.report.sheet_frames)
  rows = []
  for label, chosen in (("kept", kept), ("rejected", rejected)):
    for i in chosen:
      shard, j = ids[i]
      video = load_npz(work.shard("videos", shard))["videos"][j]
      picks = np.linspace(0, len(video), min(frames_shown, len(video)), endpoint=False).astype(int)
      strip = np.concatenate([np.asarray(Image.fromarray(video[k]).resize((cell, cell),
                                                                          Image.BILINEAR))
                              for k in picks], axis=1)
      caption = Image.new("RGB", (strip.shape[1], 14), (255, 255, 255))
      prompt = prompts[shard * size + j]["prompt"]
      ImageDraw.Draw(caption).text(
          (2, 1), f"{label} {scores[i]:+.2f}  elev {math.degrees(elevations[i]):.0f}°  {prompt}"[:90],
          fill=(0, 120, 0) if label == "kept" else (180, 0, 0))
      rows += [np.asarray(caption), strip]
  if rows:
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    sheet = np.concatenate(rows, axis=0)
    buffer = io.BytesIO()
    Image.fromarray(sheet).save(buffer, format="PNG")
    _atomic_bytes(work.path("report", "sheet.png"), buffer.getvalue())
  charts = np.concatenate([
      _histogram(scores, "quality score", marker=float(config.filter.threshold)),
      _histogram(np.degrees(elevations[keep]), "estimated elevation of kept videos, degrees")],
      axis=1)
  buffer = io.BytesIO()
  Image.fromarray(charts).save(buffer, format="PNG")
  _atomic_bytes(work.path("report", "histograms.png"), buffer.getvalue())
  summary = {"videos": int(len(scores)), "kept": int(keep.sum()),
             "kept_fraction": float(keep.mean()) if len(keep) else 0.0,
             "score_mean": float(scores.mean()),
             "elevation_mean_deg": float(np.degrees(elevations[keep]).mean()) if keep.any() else None}
  save_json(work.path("report", "summary.json"), summary)
  return summary


# --------------------------------------------------------------------------
# The job.

def _versions() -> dict[str, str]:
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  out = {}
  for package in ("vf3d_jax", "jax", "flax", "scikit-learn", "numpy"):
    try:
      out[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def stage_inputs(config, stage: str) -> dict[str, Any]:
  """What a stage depends on: its settings, seeds and the versions of the models it reads."""
  c = config
  inputs: dict[str, Any] = {"seed": int(c.seed), "shard_size": int(c.shard_size)}
  if stage == "prompts":
    inputs["prompts"] = c.prompts.to_dict()
    if c.prompts.source == "file" and os.path.isfile(str(c.prompts.file)):
      inputs["prompt_file"] = file_digest(str(c.prompts.file))
  elif stage == "frames":
    inputs["frames"] = c.frames.to_dict()
    if c.frames.source == "model" and c.frames.model:
      inputs["image_model"] = _model_version(str(c.frames.model))
  elif stage == "videos":
    inputs["video"] = c.video.to_dict()
    inputs["video_model"] = _model_version(str(c.video.model))
  elif stage == "features":
    inputs["features"] = c.features.to_dict()
  elif stage == "labels":
    inputs["labels"] = {"source": c.labels.source}
  elif stage == "filter":
    inputs.update(filter=c.filter.to_dict(), labels=c.labels.to_dict())
    if c.labels.source not in ("", "auto") and os.path.isfile(str(c.labels.source)):
      inputs["labels_file"] = file_digest(str(c.labels.source))
  elif stage == "elevation":
    inputs["elevation"] = c.elevation.to_dict()
  elif stage == "records":
    inputs.update(records=c.records.to_dict(), threshold=float(c.filter.threshold))
  return inputs


def _model_version(path: str) -> str:
  from vf3d_jax.video import sampling  # pylint: disable=g-import-not-at-top
  try:
    return file_digest(sampling.resolve_model_path(path))
  except FileNotFoundError:
    return f"missing: {path}"


# The stages whose outputs each stage reads: a changed input upstream invalidates it.
_UPSTREAM = {"frames": ("prompts",), "videos": ("frames",), "features": ("videos",),
             "labels": ("videos",), "filter": ("features", "labels"), "elevation": ("features",),
             "records": ("filter", "elevation"), "index": ("records",), "report": ("records",)}


def _stage_record(config, work: Workdir, stage: str) -> dict[str, Any]:
  upstream = {}
  for name in _UPSTREAM.get(stage, ()):
    path = work.path("stages", f"{name}.json")
    if os.path.isfile(path):
      with open(path) as f:
        upstream[name] = json.load(f)["fingerprint"]
  inputs = stage_inputs(config, stage)
  fingerprint = hashlib.sha256(json.dumps([inputs, upstream], sort_keys=True,
                                          default=str).encode()).hexdigest()[:16]
  return {"stage": stage, "inputs": inputs, "upstream": upstream, "fingerprint": fingerprint}


def check_stage(config, work: Workdir, stage: str) -> dict[str, Any]:
  """The stage's provenance; refuses a workdir whose finished work used other inputs.

  Raises:
    ValueError: the stage ran before with other settings, seeds or models (one line
      naming the fields); start a new workdir for them.
  """
  record = _stage_record(config, work, stage)
  path = work.path("stages", f"{stage}.json")
  if os.path.isfile(path):
    with open(path) as f:
      previous = json.load(f)
    unfinished_fit = stage not in SHARD_STAGES and previous.get("finished") is None
    if previous["fingerprint"] != record["fingerprint"] and not unfinished_fit:
      changed = sorted(k for k in set(previous["inputs"]) | set(record["inputs"])
                       if previous["inputs"].get(k) != record["inputs"].get(k))
      changed += [f"upstream {k}" for k in record["upstream"]
                  if previous["upstream"].get(k) != record["upstream"][k]]
      raise ValueError(f"{work.root}: the {stage} stage ran with other inputs "
                       f"({', '.join(changed) or 'upstream'}); use a new --workdir")
  return record


def _finish_stage(work: Workdir, record: dict[str, Any], **extra) -> None:
  record = dict(record, versions=_versions(), finished=time.strftime("%Y-%m-%d %H:%M:%S"), **extra)
  save_json(work.path("stages", f"{record['stage']}.json"), record)


def _finished(path: str) -> bool:
  if not os.path.isfile(path):
    return False
  with open(path) as f:
    return json.load(f).get("finished") is not None


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def run(config, workdir: str, stages: Sequence[str] = STAGES, progress: bool = True,
        process_index: int | None = None, process_count: int | None = None) -> dict[str, Any]:
  """Runs ``stages`` (in order) in ``workdir``; returns each stage's report.

  Args:
    config: ``configs/engine.py``.
    workdir: where everything is written (shared by all processes).
    stages: a subset of ``STAGES``.
    progress: a bar per shard stage on stderr.
    process_index, process_count: this process's share of the shards (default:
      ``jax.process_index()`` / ``jax.process_count()``).
  """
  from vf3d_jax import progress as progress_lib  # pylint: disable=g-import-not-at-top
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise ValueError(f"unknown stage {', '.join(unknown)}; choose from {', '.join(STAGES)}")
  index = jax.process_index() if process_index is None else process_index
  count_processes = jax.process_count() if process_count is None else process_count
  writer_lib.check_directory(workdir)
  work = Workdir(workdir)
  os.makedirs(work.path("stages"), exist_ok=True)
  models = Models(config)
  reports: dict[str, Any] = {}
  for stage in (s for s in STAGES if s in stages):
    if stage == "labels" and config.labels.source != "auto":
      continue
    record = check_stage(config, work, stage)
    stage_file = work.path("stages", f"{stage}.json")
    if index == 0 and (not os.path.isfile(stage_file) or
                       (stage not in SHARD_STAGES and not _finished(stage_file))):
      save_json(stage_file, dict(record, finished=None))  # inputs fixed from the first start
    elif stage not in SHARD_STAGES and stage != "prompts" and _finished(stage_file):
      with open(stage_file) as f:
        reports[stage] = json.load(f).get("report", {})
      continue  # done with these inputs
    if stage == "prompts":
      if index == 0:
        prompts = make_prompts(config)
        path = work.path(PROMPTS)
        if os.path.isfile(path) and read_prompts(work) != prompts:
          raise ValueError(f"{path} holds other prompts; use a new --workdir")
        _atomic_bytes(path, "".join(json.dumps(r) + "\n" for r in prompts).encode())
        _finish_stage(work, record, prompts=len(prompts))
      _barrier("prompts")
      reports[stage] = {"prompts": len(read_prompts(work))}
      continue
    prompts = read_prompts(work)
    size = int(config.shard_size)
    count = num_shards(prompts, size)
    if stage in SHARD_STAGES:
      mine = my_shards(count, index, count_processes)
      todo = [s for s in mine if not os.path.isfile(work.shard(stage, s))]
      bar = progress_lib.bar(total=len(mine), initial=len(mine) - len(todo), desc=stage,
                             unit="shard") if progress else None
      start = time.perf_counter()
      for shard in todo:
        rows = shard_prompts(prompts, shard, size)
        if stage == "frames":
          out = stage_frames(config, models, rows, shard)
        elif stage == "videos":
          out = stage_videos(config, models, rows, shard, work)
        elif stage == "features":
          out = stage_features(config, models, rows, shard, work)
        elif stage == "labels":
          out = stage_labels(config, models, rows, shard, work)
        else:
          out = stage_records(config, models, rows, shard, work, count)
        save_npz(work.shard(stage, shard), ids=np.array([r["id"] for r in rows]), **out)
        if bar is not None:
          bar.update(1)
      if bar is not None:
        bar.close()
      seconds = time.perf_counter() - start
      reports[stage] = {"shards": len(todo), "videos": sum(
          len(shard_prompts(prompts, s, size)) for s in todo), "seconds": seconds}
      _barrier(stage)
      if index == 0 and all(os.path.isfile(work.shard(stage, s)) for s in range(count)):
        _finish_stage(work, record)
    elif index == 0:
      if stage == "filter":
        reports[stage] = fit_filter(config, work, prompts, count)
      elif stage == "elevation":
        reports[stage] = fit_elevation(config, models, work)
      elif stage == "index":
        reports[stage] = write_index(config, work, count)
      else:
        reports[stage] = write_report(config, work, prompts, count)
      save_json(work.path("report", f"{stage}.json"), reports[stage])
      _finish_stage(work, record, report=reports[stage])
      _barrier(stage)
    else:
      _barrier(stage)
  return reports
