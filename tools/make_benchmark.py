r"""Renders a published benchmark: every split of configs/benchmark.py, and its object list.

  python -m tools.make_benchmark --config configs/benchmark.py:procedural_v1 \
      --config.output_dir=data/benchmarks

-> ``<output_dir>/<name>/<split>/1.0.0/`` record shards (resumable: a rerun
finishes an interrupted one) and ``<output_dir>/<name>/objects.tsv``: one row
per object (split, family, id, caption, SHA-256 of its serialized record).
The published list is ``docs/benchmarks/<name>.tsv``; this command says
whether the regenerated set equals it.
"""

from __future__ import annotations

import hashlib
import os

import grain

from vf3d_jax import cli
from vf3d_jax.data import pipeline
from vf3d_jax.data import records
from vf3d_jax.data import render_orbits

_CONFIG = cli.define_config(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "benchmark.py"),
    "Benchmark configuration.")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "split\tfamily\tid\tcaption\tsha256"


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


def object_rows(config, directories: dict[str, str]) -> list[str]:
  """The object list's rows, in record order."""
  rows = [HEADER]
  for split, directory in directories.items():
    source = grain.sources.ArrayRecordDataSource(pipeline.find_shards(directory))
    for index in range(len(source)):
      serialized = source[index]
      record = records.parse(serialized)
      rows.append("\t".join((split, str(config.families[split]), record.asset_id,
                             record.caption, hashlib.sha256(serialized).hexdigest())))
  return rows


def make_benchmark(config) -> tuple[str, bool | None]:
  """Renders (or finishes) every split and writes the object list.

  Returns:
    ``(objects.tsv path, equal to the published list or None if none is published)``.
  """
  configs = split_configs(config)
  for split_config in configs.values():  # every split's settings, before anything renders
    render_orbits.validate_config(split_config)
  directories = {split: render_orbits.render_dataset(c) for split, c in configs.items()}
  rows = object_rows(config, directories)
  path = os.path.join(str(config.output_dir), str(config.name), "objects.tsv")
  with open(path + ".tmp", "w") as f:
    f.write("\n".join(rows) + "\n")
  os.replace(path + ".tmp", path)
  published = published_list(str(config.name))
  if not os.path.isfile(published):
    return path, None
  with open(published) as f:
    return path, f.read() == "\n".join(rows) + "\n"


def main(argv):
  del argv  # cli.run refuses stray arguments.
  path, same = make_benchmark(_CONFIG.value)
  if same is None:
    print(f"wrote {path} (no published list to compare with)")
  elif same:
    print(f"wrote {path}: equal to the published {published_list(_CONFIG.value.name)}")
  else:
    cli.fail(f"{path} differs from the published {published_list(_CONFIG.value.name)} "
             "(other settings or package versions)", 1)


if __name__ == "__main__":
  cli.run(main)
