r"""Renders a published benchmark: every split of configs/benchmark.py, and its object list.

  python -m tools.make_benchmark --config configs/benchmark.py:procedural_v1 \
      --config.output_dir=data/benchmarks

-> ``<output_dir>/<name>/<split>/1.0.0/`` record shards (resumable: a rerun
finishes an interrupted one) and ``<output_dir>/<name>/objects.tsv``: one row
per object (split, family, id, caption, and a fingerprint of its views: the
mean opacity and the opacity-weighted mean colour over all views' pixels).
The published list is ``docs/benchmarks/<name>.tsv``; this command says
whether the regenerated set matches it: ids and captions exactly, fingerprints
within ``FINGERPRINT_ATOL``. (Record bytes are not compared: the renderer's
float32 arithmetic differs in its last bits between CPUs, which moves a few
anti-aliased edge pixels by one level.)
"""

from __future__ import annotations

import os

import grain
import numpy as np

from vf3d_jax import cli
from vf3d_jax.data import pipeline
from vf3d_jax.data import records
from vf3d_jax.data import render_orbits

_CONFIG = cli.define_config(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "benchmark.py"),
    "Benchmark configuration.")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "split\tfamily\tid\tcaption\topacity\tcolour"
# Fingerprints agree to this between machines (last-bit float differences move a
# few edge pixels by 1/255: far below it); a changed shape, size, colour, pattern
# or camera moves them by far more.
FINGERPRINT_ATOL = 1e-3


def published_list(name: str) -> str:
  return os.path.join(REPO, "docs", "benchmarks", f"{name}.tsv")


def split_configs(config):
  """``{split: render config}`` with each split's folder filled in."""
  out = {}
  for split in config.splits:
    split_config = config.splits[split].copy_and_resolve_references()
    split_config.output_dir = os.path.join(str(config.output_dir), str(config.name))
    split_config.name = split
    out[split] = split_config
  return out


def fingerprint(record: records.MultiViewRecord) -> tuple[str, str]:
  """``(mean opacity, "r g b" opacity-weighted mean colour)`` over all views, as written."""
  views = np.stack([records.decode_png(image) for image in record.images]).astype(np.float64)
  views /= 255.0
  alpha = views[..., 3:] if views.shape[-1] == 4 else np.ones_like(views[..., :1])
  colour = (views[..., :3] * alpha).sum(axis=(0, 1, 2)) / max(float(alpha.sum()), 1e-12)
  return f"{alpha.mean():.5f}", " ".join(f"{c:.5f}" for c in colour)


def object_row(split: str, family: str, record: records.MultiViewRecord) -> list[str]:
  return [split, family, record.asset_id, record.caption, *fingerprint(record)]


def object_rows(config, directories: dict[str, str]) -> list[list[str]]:
  """The object list's rows (header first), in record order."""
  rows = [HEADER.split("\t")]
  for split, directory in directories.items():
    source = grain.sources.ArrayRecordDataSource(pipeline.find_shards(directory))
    for index in range(len(source)):
      rows.append(object_row(split, str(config.families[split]), records.parse(source[index])))
  return rows


def read_list(path: str) -> list[list[str]]:
  with open(path) as f:
    return [line.split("\t") for line in f.read().splitlines()]


def row_difference(row: list[str], published: list[str]) -> str | None:
  """What differs between a regenerated row and the published one, or None."""
  names = HEADER.split("\t")
  if len(row) != len(published):
    return f"{len(published)} columns published, {len(row)} made"
  for name, made, want in zip(names, row, published):
    if name in ("opacity", "colour"):
      made_values, want_values = np.array(made.split(), float), np.array(want.split(), float)
      if made_values.shape != want_values.shape or \
          np.abs(made_values - want_values).max() > FINGERPRINT_ATOL:
        return f"{name} {made} (published {want})"
    elif made != want:
      return f"{name} {made!r} (published {want!r})"
  return None


def list_difference(rows: list[list[str]], published: list[list[str]]) -> str | None:
  """The first difference between two object lists (header first), or None."""
  if rows[:1] != published[:1]:
    return f"the header {published[:1]} (made {rows[:1]})"
  if len(rows) != len(published):
    return f"the length: {len(published) - 1} objects published, {len(rows) - 1} made"
  for made, want in zip(rows[1:], published[1:]):
    difference = row_difference(made, want)
    if difference:
      return f"{want[0]} {want[2]}: {difference}"
  return None


def make_benchmark(config) -> tuple[str, str | None]:
  """Renders (or finishes) every split and writes the object list.

  Returns:
    ``(objects.tsv path, the first difference from the published list, or "" if it
    matches, or None if none is published)``.
  """
  configs = split_configs(config)
  for split_config in configs.values():  # every split's settings, before anything renders
    render_orbits.validate_config(split_config)
  directories = {split: render_orbits.render_dataset(c) for split, c in configs.items()}
  rows = object_rows(config, directories)
  path = os.path.join(str(config.output_dir), str(config.name), "objects.tsv")
  with open(path + ".tmp", "w") as f:
    f.write("".join("\t".join(row) + "\n" for row in rows))
  os.replace(path + ".tmp", path)
  published = published_list(str(config.name))
  if not os.path.isfile(published):
    return path, None
  return path, list_difference(rows, read_list(published)) or ""


def main(argv):
  del argv  # cli.run refuses stray arguments.
  path, difference = make_benchmark(_CONFIG.value)
  published = published_list(_CONFIG.value.name)
  if difference is None:
    print(f"wrote {path} (no published list to compare with)")
  elif not difference:
    print(f"wrote {path}: matches the published {published}")
  else:
    cli.fail(f"{path} differs from the published {published} at {difference} "
             "(other settings or package versions)", 1)


if __name__ == "__main__":
  cli.run(main)
