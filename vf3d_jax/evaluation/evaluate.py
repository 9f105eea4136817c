r"""Scores a single-image 3D model on a benchmark: numbers with intervals, and pictures.

``python -m vf3d_jax.evaluate`` (``vf3d_jax/evaluate.py``) calls :func:`evaluate`.

Benchmarks come in two kinds:

* **Record benchmarks**: multi-view record shards with ground-truth views
  (``tools.make_benchmark``'s procedural sets, or any ``tools.render_orbits``
  output, e.g. rendered from a GSO or OmniObject3D folder in meshes mode). A
  folder of splits (``<data>/<split>/1.0.0/``) is scored split by split; a
  single dataset folder is one split named after it.
* **Image sets**: a folder of images, each with an optional prompt (a
  ``<stem>.txt`` beside it, or a ``prompts.jsonl`` of ``{"image": file name,
  "prompt": text}`` rows), such as the paper's prompt images.

Protocol for records (each object):

1. **Input.** View ``eval.source_view`` of the record (default 0, the first
   orbit view), composited on white and resized to the model's input with
   infer's own functions. Record views already frame the object as the model's
   canonical camera does, so the view is not recentred (``eval.recenter_records``
   recentres it exactly as ``infer`` does, matte and ``foreground_ratio``
   included; the ground-truth cameras then no longer match the input's framing).
2. **Reconstruction** from the canonical source camera: the canonical pose
   with the source view's intrinsics, as in training.
3. **Novel views.** Every other view of the record (or ``eval.num_views`` of
   them, evenly spaced), its camera mapped into the model's frame with the
   record's source camera (``views.canonicalize_cameras``, distance
   ``eval.canonical_distance``), rendered at ``render.resolution`` (0: the
   record's) with the model's renderer, background white.
4. **Image metrics** on those views against the ground truth composited on
   white, over the whole frame (no mask): PSNR, SSIM (skimage's Gaussian
   SSIM) and LPIPS (VGG16, v0.1, real weights); **silhouette IoU** of the
   rendered opacity against the ground-truth alpha, both thresholded at
   ``eval.iou_threshold``.
5. **Geometry**: the mesh extracted as infer does (``mesh.resolution``,
   density ``mesh.threshold``) is taken back to the record's world frame and
   sampled uniformly by area (``eval.geometry_points``), against the record's
   true surface points (exact for procedural assets, area-weighted for
   meshes; ``render.surface_points``): Chamfer distance (mean of the two mean
   nearest-neighbour L2 distances) and precision / recall / F-score at
   ``eval.fscore_thresholds`` (world units; procedural objects span [-1, 1]).
   Records without surface points skip it; an empty mesh scores F = 0 and no
   Chamfer distance.
6. **CLIP** (with ``clip.models``): the mean cosine between the input image
   and ``clip.num_views`` of the rendered novel views (evenly spaced), and
   between those renders and the record's caption. For image sets the views
   are a turntable of ``render.num_views`` views (infer's orbit) and the text
   is the image's prompt, when it has one.

Outputs in ``--output``:

* ``objects.jsonl``: one row per object (split, id, caption, every metric,
  seconds per stage), appended as each object is scored, so an interrupted run
  resumes where it stopped (with the same settings; others are refused);
* ``summary.json`` and ``summary.md``: per split and metric the mean, median
  and a percentile-bootstrap interval of the mean (``eval.confidence``,
  ``eval.bootstrap_samples`` resamples), the mean seconds per stage and each
  stage's share, objects per second (timing leaves out the first object a
  run scores: it compiles);
* ``sheet_<split>.png``: a contact sheet, a row per object: input | ground
  truth views | predicted views (image sets: input | turntable).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Iterator, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import tqdm

from vf3d_jax import pretrained
from vf3d_jax import progress as progress_lib
from vf3d_jax.data import pipeline as data_pipeline
from vf3d_jax.data import records
from vf3d_jax.data import views as views_lib
from vf3d_jax.evaluation import geometry
from vf3d_jax.evaluation import metrics
from vf3d_jax.inference import mesh as mesh_lib
from vf3d_jax.inference import pipeline as infer_pipeline
from vf3d_jax.inference import preprocess
from vf3d_jax.losses import lpips as lpips_lib
from vf3d_jax.rendering import cameras

ROWS = "objects.jsonl"
SETTINGS = "settings.json"
PROMPTS = "prompts.jsonl"
# Metrics where lower is better (the rest: higher).
LOWER_IS_BETTER = ("lpips", "chamfer", "accuracy", "completeness")
# Stages timed per object, in order.
STAGES = ("load", "preprocess", "planes", "render", "image_metrics", "lpips", "mesh", "geometry",
          "clip")


@dataclasses.dataclass
class Benchmark:
  """What ``--data`` names: record splits or an image set."""

  kind: str  # "records" or "images"
  splits: dict[str, Any]  # split -> shard paths (records) or image paths (images)


def find_benchmark(data: str, splits: str = "") -> Benchmark:
  """Record splits or images under ``data``.

  Raises:
    FileNotFoundError: nothing to score there.
    ValueError: ``splits`` names a split that is not there.
  """
  if not os.path.exists(data):
    raise FileNotFoundError(f"--data {data}: no such file or folder")
  found: dict[str, Any] = {}
  if os.path.isdir(data):
    for name in sorted(os.listdir(data)):
      folder = os.path.join(data, name)
      if os.path.isdir(folder) and not name.startswith("."):
        try:
          shards = data_pipeline.find_shards(folder)
        except ValueError:
          shards = []
        if shards:
          found[name] = shards
    if not found:
      shards = data_pipeline.find_shards(data)
      if shards:
        found[os.path.basename(os.path.normpath(data))] = shards
  if found:
    kind = "records"
  else:
    try:
      images = infer_pipeline.list_images(data)
    except FileNotFoundError:
      raise FileNotFoundError(f"--data {data}: no record shards and no images") from None
    kind, found = "images", {os.path.basename(os.path.normpath(data)) or "images": images}
  wanted = [s.strip() for s in str(splits).split(",") if s.strip()]
  if wanted:
    missing = [s for s in wanted if s not in found]
    if missing:
      raise ValueError(f"eval.splits: {', '.join(missing)} not in {data} "
                       f"(it holds {', '.join(found)})")
    found = {s: found[s] for s in wanted}
  return Benchmark(kind, found)


def validate_config(config) -> None:
  """Checks the evaluation settings (and infer's) before any work.

  Raises:
    ValueError: the first bad field, by name.
  """
  e = config.eval
  for field in ("bootstrap_samples", "geometry_points", "sheet_views"):
    if e[field] < 1:
      raise ValueError(f"eval.{field} must be positive, got {e[field]!r}")
  for field in ("num_views", "num_objects", "source_view", "sheet_objects"):
    if e[field] < 0:
      raise ValueError(f"eval.{field} must be >= 0, got {e[field]!r}")
  if not 0 < e.confidence < 1:
    raise ValueError(f"eval.confidence must be in (0, 1), got {e.confidence!r}")
  if not 0 <= e.iou_threshold < 1:
    raise ValueError(f"eval.iou_threshold must be in [0, 1), got {e.iou_threshold!r}")
  if not e.fscore_thresholds or min(e.fscore_thresholds) <= 0:
    raise ValueError(f"eval.fscore_thresholds must be positive, got {e.fscore_thresholds!r}")
  if config.render.resolution < 0 or config.render.num_views < 1 or config.clip.num_views < 1:
    raise ValueError("render.resolution must be >= 0, render.num_views and clip.num_views >= 1")
  probe = config.copy_and_resolve_references()
  probe.render.resolution = max(1, probe.render.resolution)
  infer_pipeline.validate_config(probe)


# --------------------------------------------------------------------------
# Objects.

@dataclasses.dataclass
class RecordObject:
  """One record, ready to score."""

  split: str
  object_id: str
  caption: str
  source_rgba: np.ndarray  # [H, W, 4] float32 straight alpha
  source_camera: np.ndarray  # [16] model conditioning: the canonical pose, the view's intrinsics
  c2w: np.ndarray  # [V, 4, 4] novel views, model frame
  intrinsics: np.ndarray  # [V, 4]
  rgb: np.ndarray  # [V, R, R, 3] ground truth on white
  alpha: np.ndarray  # [V, R, R]
  world_transform: np.ndarray  # [4, 4] p_model = world_transform @ p_world
  surface: np.ndarray | None  # [N, 3] world frame


def novel_view_indices(num_views: int, source: int, wanted: int) -> list[int]:
  """The views other than ``source``; ``wanted`` of them evenly spaced (0: all)."""
  others = [v for v in range(num_views) if v != source]
  if not wanted or wanted >= len(others):
    return others
  return [others[int(i)] for i in np.linspace(0, len(others), wanted, endpoint=False)]


def _view_at(rgba_uint8: np.ndarray, resolution: int) -> tuple[np.ndarray, np.ndarray]:
  """A stored view on white and its alpha at ``resolution`` (box-averaged when it divides)."""
  rgb, alpha = views_lib.composite(rgba_uint8, np.ones(3, np.float32))
  stored = rgb.shape[0]
  if stored == resolution:
    return rgb, alpha
  if stored % resolution == 0 and rgb.shape[1] == stored:
    factor = stored // resolution
    return views_lib.box_downsample(rgb, factor), views_lib.box_downsample(alpha, factor)
  return views_lib.resize(rgb, resolution), views_lib.resize(alpha, resolution)


def record_object(split: str, serialized: bytes, config) -> RecordObject:
  """Parses one record into what the protocol needs (see the module docstring)."""
  e = config.eval
  record = records.parse(serialized, min_views=2)
  source = int(e.source_view)
  if source >= record.num_views:
    raise records.BadRecordError(f"eval.source_view {source}: the record has {record.num_views} views")
  distance = float(e.canonical_distance) if e.canonical_distance > 0 else None
  c2w, world, _ = views_lib.canonicalize_cameras(record.c2w, source, distance)
  novel = novel_view_indices(record.num_views, source, int(e.num_views))
  source_rgba = records.decode_png(record.images[source]).astype(np.float32) / 255.0
  resolution = int(config.render.resolution) or source_rgba.shape[0]
  rgb, alpha = zip(*(_view_at(records.decode_png(record.images[v]), resolution) for v in novel))
  return RecordObject(
      split=split, object_id=record.asset_id, caption=record.caption, source_rgba=source_rgba,
      source_camera=cameras.camera_conditioning(c2w[source], record.intrinsics[source],
                                                xp=np).astype(np.float32),
      c2w=c2w[novel], intrinsics=record.intrinsics[novel].astype(np.float32),
      rgb=np.stack(rgb), alpha=np.stack(alpha), world_transform=world, surface=record.surface)


def iter_records(split: str, shards: Sequence[str], config) -> Iterator[tuple[str, Any]]:
  """``(object id or error key, RecordObject | exception)`` in record order."""
  source = grain.sources.ArrayRecordDataSource(list(shards))
  count = len(source) if not config.eval.num_objects else min(len(source), config.eval.num_objects)
  for index in range(count):
    try:
      obj = record_object(split, source[index], config)
      yield obj.object_id, obj
    except records.BadRecordError as error:
      yield f"record-{index}", error


def model_input(obj: RecordObject, config, size: int) -> np.ndarray:
  """``[S, S, 3]``: the source view as the model sees it (see the protocol, step 1)."""
  if config.eval.recenter_records:
    image, _ = preprocess.preprocess_image(
        obj.source_rgba, size=size, foreground_ratio=config.preprocess.foreground_ratio,
        matting_fn=config.preprocess.matting, max_side=config.preprocess.max_side)
    return image
  premultiplied = obj.source_rgba.copy()
  premultiplied[..., :3] *= premultiplied[..., 3:]
  return preprocess.resize_to_model_input(preprocess.composite_on_white(premultiplied), size)


def read_prompts(paths: Sequence[str]) -> dict[str, str]:
  """``{image path: prompt}`` from ``<stem>.txt`` files and a ``prompts.jsonl`` beside them.

  Raises:
    ValueError: a ``prompts.jsonl`` line that is not ``{"image": ..., "prompt": ...}``.
  """
  prompts = {}
  folders = sorted({os.path.dirname(p) for p in paths})
  by_name = {os.path.basename(p): p for p in paths}
  for folder in folders:
    table = os.path.join(folder, PROMPTS)
    if os.path.isfile(table):
      with open(table) as f:
        for number, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            row = json.loads(line)
            name, prompt = row["image"], row["prompt"]
            if not isinstance(name, str) or not isinstance(prompt, str):
              raise TypeError
          except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{table} line {number}: want {{\"image\": file name, "
                             f"\"prompt\": text}}") from None
          if name in by_name:
            prompts[by_name[name]] = prompt
  for path in paths:
    text = os.path.splitext(path)[0] + ".txt"
    if os.path.isfile(text):
      with open(text) as f:
        prompts[path] = f.read().strip()
  return prompts


# --------------------------------------------------------------------------
# Scoring.

class Scorer:
  """The model, its compiled functions and the metric models of one evaluation."""

  def __init__(self, arch, params, config, clip_scorers: Sequence[Any], lpips_params):
    self.config = config
    self.arch = arch
    self.reconstructor = infer_pipeline.Reconstructor(arch, params, config)
    self.clip_scorers = list(clip_scorers)
    self.lpips_params = lpips_params

  def planes(self, image: np.ndarray, camera: np.ndarray) -> jax.Array:
    return self.reconstructor.planes(image, camera)

  def render(self, planes, c2w, intrinsics, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rgb [V, R, R, 3], opacity [V, R, R])``, deterministic, ``render.views_per_call`` at a time."""
    step = max(1, int(self.config.render.views_per_call))
    rgb, opacity = [], []
    occupancy = self.reconstructor.occupancy(planes)  # the fast mode's grid, once an object
    for i in range(0, len(c2w), step):
      out = self.reconstructor.render_cameras(planes, c2w[i:i + step], intrinsics[i:i + step],
                                              resolution, occupancy=occupancy)
      rgb.append(np.asarray(out["rgb"]))
      opacity.append(np.asarray(out["opacity"]))
    return np.clip(np.concatenate(rgb), 0.0, 1.0), np.concatenate(opacity)

  def clip_scores(self, renders: np.ndarray, reference: np.ndarray | None,
                  text: str | None) -> dict[str, float]:
    out = {}
    for scorer in self.clip_scorers:
      if reference is not None:
        out[f"clip_image/{scorer.name}"] = float(scorer.image_similarity(renders, reference))
      if text:
        out[f"clip_text/{scorer.name}"] = float(scorer.text_similarity(renders, text))
    return out


def _timed(seconds: dict[str, float], stage: str, fn, *args):
  start = time.perf_counter()
  result = jax.block_until_ready(fn(*args))
  seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start
  return result


def _evenly(items: np.ndarray, count: int) -> np.ndarray:
  if count >= len(items):
    return items
  return items[np.linspace(0, len(items), count, endpoint=False).astype(int)]


def score_record(scorer: Scorer, obj: RecordObject, load_seconds: float):
  """One record's row and its pictures ``(input, truth views, predicted views)``."""
  config = scorer.config
  e = config.eval
  seconds = {"load": load_seconds}
  image = _timed(seconds, "preprocess", model_input, obj, config, scorer.arch.input_size)
  planes = _timed(seconds, "planes", scorer.planes, image, obj.source_camera)
  resolution = obj.rgb.shape[1]
  rgb, opacity = _timed(seconds, "render", scorer.render, planes, obj.c2w, obj.intrinsics,
                        resolution)
  row: dict[str, Any] = {"split": obj.split, "id": obj.object_id, "caption": obj.caption,
                         "views": len(obj.c2w)}

  def image_scores():
    psnr = metrics.psnr(jnp.asarray(rgb), jnp.asarray(obj.rgb))
    ssim = metrics.ssim(jnp.asarray(rgb), jnp.asarray(obj.rgb))
    iou = geometry.silhouette_iou(opacity, obj.alpha, float(e.iou_threshold))
    return {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)),
            "iou": float(np.mean(np.asarray(iou)))}

  row.update(_timed(seconds, "image_metrics", image_scores))
  if scorer.lpips_params is not None:
    row["lpips"] = float(np.mean(_timed(seconds, "lpips", metrics.lpips, scorer.lpips_params,
                                        jnp.asarray(rgb), jnp.asarray(obj.rgb))))
  if obj.surface is not None and len(obj.surface):
    try:
      mesh, _ = _timed(seconds, "mesh", scorer.reconstructor.mesh, planes, False)
      vertices = geometry.mesh_to_world(mesh.vertices, obj.world_transform)
      faces = mesh.faces
    except mesh_lib.EmptyMeshError:
      vertices, faces = np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64)

    def geometry_scores():
      points = geometry.sample_mesh_surface(vertices, faces, int(e.geometry_points), seed=0)
      scores = geometry.chamfer_and_fscore(points, obj.surface, tuple(e.fscore_thresholds))
      scores = {k: v for k, v in scores.items() if k != "empty_prediction"}
      scores["chamfer"] = None if math.isnan(scores["chamfer"]) else scores["chamfer"]
      for key in ("accuracy", "completeness"):
        scores[key] = None if math.isnan(scores[key]) else scores[key]
      return scores

    row.update(_timed(seconds, "geometry", geometry_scores))
    row["mesh_vertices"] = int(len(vertices))
  if scorer.clip_scorers:
    clip_views = _evenly(rgb, int(config.clip.num_views))
    row.update(_timed(seconds, "clip", scorer.clip_scores, clip_views, image, obj.caption))
  row["seconds"] = {k: round(v, 4) for k, v in seconds.items()}
  return row, (image, obj.rgb, rgb)


def score_image(scorer: Scorer, split: str, path: str, prompt: str | None):
  """One image's row and pictures ``(input, turntable)``."""
  config = scorer.config
  seconds = {}
  start = time.perf_counter()
  image, _ = preprocess.preprocess_image(
      path, size=scorer.arch.input_size, foreground_ratio=config.preprocess.foreground_ratio,
      matting_fn=config.preprocess.matting, max_side=config.preprocess.max_side)
  seconds["preprocess"] = time.perf_counter() - start
  planes = _timed(seconds, "planes", scorer.planes, image,
                  np.asarray(cameras.DEFAULT_SOURCE_CAMERA, np.float32))
  c2w, intrinsics = scorer.reconstructor.turntable_cameras(None)
  resolution = int(config.render.resolution) or 256
  rgb, _ = _timed(seconds, "render", scorer.render, planes, np.asarray(c2w),
                  np.asarray(intrinsics), resolution)
  row: dict[str, Any] = {"split": split, "id": os.path.basename(path), "caption": prompt or ""}
  if scorer.clip_scorers:
    row.update(_timed(seconds, "clip", scorer.clip_scores, _evenly(rgb, int(config.clip.num_views)),
                      image, prompt))
  row["seconds"] = {k: round(v, 4) for k, v in seconds.items()}
  return row, (image, None, rgb)


# --------------------------------------------------------------------------
# Summaries.

def bootstrap_interval(values: np.ndarray, samples: int, confidence: float,
                       seed: int) -> tuple[float, float]:
  """Percentile-bootstrap interval of the mean of ``values``."""
  values = np.asarray(values, np.float64)
  if len(values) < 2:
    return float(values.mean()), float(values.mean())
  rng = np.random.default_rng(seed)
  means = values[rng.integers(0, len(values), (samples, len(values)))].mean(axis=1)
  tail = (1.0 - confidence) / 2.0
  low, high = np.quantile(means, [tail, 1.0 - tail])
  return float(low), float(high)


def metric_names(rows: Sequence[dict]) -> list[str]:
  skip = {"split", "id", "caption", "views", "seconds", "mesh_vertices", "compiles"}
  names = []
  for row in rows:
    names += [k for k, v in row.items() if k not in skip and k not in names
              and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))]
  return names


def summarize(rows: Sequence[dict], config) -> dict[str, Any]:
  """Per split: each metric's mean, median and bootstrap interval; seconds per stage."""
  e = config.eval
  out = {}
  for split in dict.fromkeys(r["split"] for r in rows):
    split_rows = [r for r in rows if r["split"] == split]
    scores = {}
    for name in metric_names(split_rows):
      values = np.array([r[name] for r in split_rows if r.get(name) is not None], np.float64)
      if not len(values):
        continue
      low, high = bootstrap_interval(values, int(e.bootstrap_samples), float(e.confidence),
                                     int(e.seed))
      scores[name] = {"mean": float(values.mean()), "median": float(np.median(values)),
                      "ci": [low, high], "n": int(len(values)),
                      "better": "lower" if name in LOWER_IS_BETTER else "higher"}
    # Timing leaves out the first object a process scored (it compiles), unless it is alone.
    timed = [r for r in split_rows if not r.get("compiles")] or split_rows
    stages = {}
    for stage in STAGES:
      times = [r["seconds"][stage] for r in timed if stage in r["seconds"]]
      if times:
        stages[stage] = float(np.mean(times))
    total = sum(stages.values())
    out[split] = {
        "objects": len(split_rows), "metrics": scores,
        "seconds_per_object": {k: round(v, 4) for k, v in stages.items()},
        "stage_share": {k: round(v / total, 4) for k, v in stages.items()} if total else {},
        "objects_per_second": round(1.0 / total, 4) if total else None,
    }
  return out


def summary_markdown(summary: dict[str, Any]) -> str:
  lines = [f"# {summary['model']} on {summary['data']}", ""]
  interval = int(round(100 * summary["confidence"]))
  for split, part in summary["splits"].items():
    lines += [f"## {split} ({part['objects']} objects)", "",
              f"| metric | mean | median | {interval}% interval | n |", "|---|---|---|---|---|"]
    for name, s in part["metrics"].items():
      arrow = "↓" if s["better"] == "lower" else "↑"
      lines.append(f"| {name} {arrow} | {s['mean']:.4f} | {s['median']:.4f} | "
                   f"[{s['ci'][0]:.4f}, {s['ci'][1]:.4f}] | {s['n']} |")
    lines += ["", "| stage | s / object | share |", "|---|---|---|"]
    for stage, t in part["seconds_per_object"].items():
      lines.append(f"| {stage} | {t:.4f} | {100 * part['stage_share'][stage]:.1f}% |")
    lines += ["", f"{part['objects_per_second']} objects/s", ""]
  return "\n".join(lines)


def contact_sheet(pictures: Sequence[tuple], num_views: int, cell: int = 128) -> np.ndarray:
  """``[H, W, 3]`` uint8: a labelled row per object, input | truth views | predicted views."""
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top

  def tile(image):
    return np.asarray(Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
                      .resize((cell, cell), Image.BILINEAR))

  gap = 4
  rows, labels = [], ["input"]
  for image, truth, predicted in pictures:
    groups = [[image]]
    if truth is not None:
      groups.append(list(_evenly(truth, num_views)))
    groups.append(list(_evenly(predicted, num_views)))
    if len(labels) == 1:
      labels += (["truth"] if truth is not None else []) + ["predicted"]
    parts = []
    for group in groups:
      parts += [tile(c) for c in group] + [np.full((cell, gap, 3), 255, np.uint8)]
    rows.append(np.concatenate(parts[:-1], axis=1))
    rows.append(np.full((gap, rows[-1].shape[1], 3), 255, np.uint8))
  sheet = np.concatenate(rows[:-1], axis=0)
  header = Image.new("RGB", (sheet.shape[1], 16), (255, 255, 255))
  draw = ImageDraw.Draw(header)
  x = 0
  for label, width in zip(labels, [1] + [min(num_views, 10 ** 6)] * (len(labels) - 1)):
    draw.text((x + 3, 2), label, fill=(0, 0, 0))
    x += width * cell + gap * width
  return np.concatenate([np.asarray(header), sheet], axis=0)


# --------------------------------------------------------------------------
# The job.

def _settings(config, checkpoint: str, data: str) -> dict[str, Any]:
  """What a resumed run must share with the one that wrote the rows."""
  return {"config": json.loads(config.to_json_best_effort()), "checkpoint": os.path.abspath(checkpoint),
          "data": os.path.abspath(data)}


def _open_rows(output: str, settings: dict[str, Any]) -> list[dict]:
  """The rows a previous run with the same settings wrote (resume), else none.

  Raises:
    ValueError: ``output`` holds rows of an evaluation with other settings.
  """
  rows_path, settings_path = os.path.join(output, ROWS), os.path.join(output, SETTINGS)
  if os.path.isfile(settings_path):
    with open(settings_path) as f:
      previous = json.load(f)
    if previous != settings:
      changed = sorted(k for k in set(previous) | set(settings)
                       if previous.get(k) != settings.get(k))
      raise ValueError(f"--output {output} holds an evaluation with other settings "
                       f"({', '.join(changed)} differ); choose another folder")
  os.makedirs(output, exist_ok=True)
  with open(settings_path + ".tmp", "w") as f:
    json.dump(settings, f, indent=1)
  os.replace(settings_path + ".tmp", settings_path)
  rows = []
  if os.path.isfile(rows_path):
    with open(rows_path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          break  # a line cut short by a kill: scored again
    # Rewrite without a torn last line.
    with open(rows_path + ".tmp", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(rows_path + ".tmp", rows_path)
  return rows


def _write_atomic(path: str, write) -> None:
  tmp = path + ".tmp"
  write(tmp)
  os.replace(tmp, path)


def load_clip_scorers(models: str) -> list[Any]:
  paths = [p.strip() for p in str(models).split(",") if p.strip()]
  if not paths:
    return []
  from vf3d_jax.evaluation import clip_score  # pylint: disable=g-import-not-at-top
  return [clip_score.CLIPScorer.from_pretrained(p) for p in paths]


def evaluate(config, checkpoint: str, data: str, output: str,
             progress: bool = True) -> dict[str, Any]:
  """Scores the model at ``checkpoint`` on ``data``; writes and returns the summary.

  Progress (objects done / total, rate, ETA) goes to stderr unless ``progress``
  is False: a bar on a terminal, a line a minute into a log.

  Everything the user named (settings, data, output folder, CLIP folders, LPIPS
  weights) is checked before the model loads.

  Raises:
    FileNotFoundError, NotADirectoryError, PermissionError, ValueError,
    pretrained's CheckpointError: one line naming the problem.
  """
  validate_config(config)
  benchmark = find_benchmark(data, config.eval.splits)
  infer_pipeline.check_output(output)
  if not os.path.exists(checkpoint):
    raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file or folder")
  lpips_params = None
  if benchmark.kind == "records":
    lpips_params = lpips_lib.resolve_lpips_params(config.eval.lpips_weights)
  clip_scorers = load_clip_scorers(config.clip.models)
  rows = _open_rows(output, _settings(config, checkpoint, data))
  done = {(r["split"], r["id"]) for r in rows}
  with jax.default_matmul_precision(config.get("precision", "highest")):
    arch, params = pretrained.load_lrm(checkpoint, pos_resize=config.model.pos_resize)
    scorer = Scorer(arch, params, config, clip_scorers, lpips_params)
    pictures: dict[str, list] = {}
    errors, first = 0, True
    with open(os.path.join(output, ROWS), "a") as sink:
      for split, items in benchmark.splits.items():
        pictures[split] = []
        if benchmark.kind == "records":
          start = time.perf_counter()
          stream = iter_records(split, items, config)
          total = len(grain.sources.ArrayRecordDataSource(list(items)))
          if config.eval.num_objects:
            total = min(total, int(config.eval.num_objects))
        else:
          prompts = read_prompts(items)
          stream = ((os.path.basename(p), p) for p in items)
          total = len(items)
        bar = (progress_lib.bar(stream, total=total, desc=split, unit="object")
               if progress is not False else stream)
        for object_id, item in bar:
          load_seconds = time.perf_counter() - start if benchmark.kind == "records" else 0.0
          want_picture = len(pictures[split]) < int(config.eval.sheet_objects)
          if isinstance(item, Exception):
            tqdm.tqdm.write(f"{split}/{object_id}: skipped: {item}", file=sys.stderr)
            errors += 1
          elif (split, object_id) not in done or want_picture:
            try:
              if benchmark.kind == "records":
                row, picture = score_record(scorer, item, load_seconds)
              else:
                row, picture = score_image(scorer, split, item, prompts.get(item))
            except (preprocess.ImageLoadError, preprocess.EmptyForegroundError) as error:
              tqdm.tqdm.write(f"{split}/{object_id}: skipped: {error}", file=sys.stderr)
              errors += 1
              row = None
            if row is not None:
              if want_picture:
                pictures[split].append(picture)
              if first:
                row["compiles"], first = True, False
              if (split, object_id) not in done:
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                rows.append(row)
                done.add((split, object_id))
          start = time.perf_counter()
  if not rows:
    raise ValueError(f"--data {data}: no object could be scored")
  summary = {"model": os.path.basename(os.path.normpath(checkpoint)), "checkpoint": checkpoint,
             "data": data, "kind": benchmark.kind, "confidence": float(config.eval.confidence),
             "clip_models": [s.name for s in clip_scorers],
             "lpips": "real VGG16 + v0.1" if not config.eval.lpips_weights else
                      str(config.eval.lpips_weights),
             "skipped": errors, "splits": summarize(rows, config)}
  _write_atomic(os.path.join(output, "summary.json"),
                lambda p: open(p, "w").write(json.dumps(summary, indent=1)))
  _write_atomic(os.path.join(output, "summary.md"),
                lambda p: open(p, "w").write(summary_markdown(summary)))
  for split, picture_list in pictures.items():
    if picture_list:
      sheet = contact_sheet(picture_list, int(config.eval.sheet_views))
      _write_atomic(os.path.join(output, f"sheet_{split}.png"),
                    lambda p, s=sheet: Image.fromarray(s).save(p, format="PNG"))
  return summary

