"""The LRM trainer's view of the data: Grain iterators per stage, fixed eval batches.

``config.data.train`` names record folders with mixing weights as
``"path[:weight],path[:weight]"`` (e.g. ``"data/synthetic:0.7,data/objaverse:0.3"``),
which keeps phases (pre-training on synthetic data, fine-tuning with more 3D
data) a one-flag change. ``path@0.25`` keeps the first quarter of a folder's
records (data-scale ablations without copying shards). The pipeline itself is
``vf3d_jax.data.pipeline``.
"""

from __future__ import annotations

import numpy as np

from vf3d_jax.data import pipeline

# What the train step reads; the pipeline's other keys stay on the host.
BATCH_KEYS = ("source_image", "source_camera", "render_c2w", "render_intrinsics", "render_rgb",
              "render_mask", "crop", "background")


def _number_suffix(text: str, separator: str) -> tuple[str, float | None]:
  """``"a@0.5"`` -> ``("a", 0.5)``; ``(text, None)`` when no number follows the last separator."""
  head, _, tail = text.rpartition(separator)
  try:
    return (head, float(tail)) if head else (text, None)
  except ValueError:  # the separator is part of the path
    return text, None


def parse_datasets(spec: str) -> list[dict]:
  """``"a:0.7,b@0.5:0.3"`` -> ``[{"path": "a", "weight": 0.7, "fraction": 1.0},
  {"path": "b", "weight": 0.3, "fraction": 0.5}]``."""
  out = []
  for part in (p.strip() for p in spec.split(",")):
    if not part:
      continue
    path, weight = _number_suffix(part, ":")
    path, fraction = _number_suffix(path, "@")
    if fraction is not None and not 0.0 < fraction <= 1.0:
      raise ValueError(f"data fraction must be in (0, 1], got {fraction} in {part!r}")
    out.append({"path": path, "weight": 1.0 if weight is None else weight,
                "fraction": 1.0 if fraction is None else fraction})
  if not out:
    raise ValueError("data.train is empty: give record folders as 'path[:weight],...' "
                     "(make them with `python -m tools.render_orbits`)")
  return out


def check_datasets(spec: str, field: str = "data.train") -> None:
  """Raises before a run starts when ``spec`` names no dataset or a folder without shards."""
  if not spec.strip():
    raise ValueError(f"{field} is empty: give record folders as 'path[:weight],...' "
                     "(make them with `python -m tools.render_orbits`)")
  for dataset in parse_datasets(spec):
    if not pipeline.find_shards(dataset["path"]):
      raise FileNotFoundError(f"{field}: no ArrayRecord shards at {dataset['path']!r}")


def _pipeline_config(data_config, spec: str, *, batch_size, num_views, input_size,
                     render_resolution, crop_size, seed, shard_index, shard_count):
  config = pipeline.default_config()
  config.datasets = parse_datasets(spec)
  config.seed = seed
  config.batch_size = batch_size
  config.num_workers = data_config.num_workers
  config.shard_index = shard_index
  config.shard_count = shard_count
  config.num_render_views = num_views
  config.input_resolution = input_size
  config.render_resolution = render_resolution
  config.crop_size = crop_size
  config.background = data_config.background
  config.strict = data_config.strict
  config.source_view = data_config.source_view
  return config


class _Select:
  """Keeps the keys the step reads (picklable for worker processes)."""

  def __call__(self, batch):
    return {k: batch[k] for k in BATCH_KEYS}


def make_train_iterator(data_config, *, batch_size, num_views, input_size, render_resolution,
                        crop_size, seed, shard_index, shard_count):
  """An endless, checkpointable iterator of this process' training batches."""
  config = _pipeline_config(data_config, data_config.train, batch_size=batch_size,
                            num_views=num_views, input_size=input_size,
                            render_resolution=render_resolution, crop_size=crop_size, seed=seed,
                            shard_index=shard_index, shard_count=shard_count)
  return iter(pipeline.make_dataset(config).map(_Select()))


def make_eval_batches(data_config, *, num_objects, num_views, input_size, render_resolution,
                      batch_size=4):
  """The first ``num_objects`` held-out objects as full-view batches (fixed for a run)."""
  config = _pipeline_config(data_config, data_config.eval, batch_size=batch_size,
                            num_views=num_views, input_size=input_size,
                            render_resolution=render_resolution, crop_size=render_resolution,
                            seed=0, shard_index=0, shard_count=1)
  config.num_workers = 0
  config.background = "white"
  config.num_epochs = 1
  config.drop_remainder = False
  batches, seen = [], 0
  for batch in pipeline.make_dataset(config):
    take = min(len(batch["source_image"]), num_objects - seen)
    batches.append({k: np.asarray(batch[k][:take]) for k in BATCH_KEYS})
    seen += take
    if seen >= num_objects:
      break
  return batches
