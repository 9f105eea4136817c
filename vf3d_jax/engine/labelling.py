"""Hand labels of a data-engine run's orbit videos: what to show next, and the labels file.

The labels are what the quality filter trains from (``labels.source`` of
``configs/engine.py``, read by ``quality.read_labels``): one row per video,
its id (the prompt id ``p-<hex>``) and ``good`` or ``bad``. The web app's
labelling page (``python -m vf3d_jax.app --labels_dir <workdir>``) shows the
run's videos one at a time through these functions.

* Videos: the engine's ``videos`` stage writes ``<workdir>/shards/videos/
  videos-NNNNN.npz`` (``ids [N]`` and ``videos [N, F, H, W, 3] uint8``); the
  prompts are in ``<workdir>/prompts.jsonl``. :func:`list_videos` lists them
  in shard order.
* Labels file: rows are added in its own format (as ``read_labels`` tells
  it, by suffix or first line: JSONL ``{"id": ..., "label": "good"}``, TSV,
  or CSV, the default, with a ``video_id,label`` header when the file is
  new). Each addition rewrites the
  file through a temporary file and a rename, so a crash leaves the old file
  or the new one, never half a row; rows already there are kept as they are.
* Skips: ``read_labels`` has no word for "skipped", so skipped ids go to a
  side file beside it, ``<labels file>.skipped`` (an id a line), which the
  filter never reads. A skipped video is not shown again.

Resuming is reading both files: :func:`next_video` is the first video of the
run that is neither labelled nor skipped.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
from typing import Sequence

import numpy as np

from vf3d_jax.engine import quality

SKIPPED_SUFFIX = ".skipped"
_SHARD = re.compile(r"videos-(\d+)\.npz$")


@dataclasses.dataclass(frozen=True)
class Video:
  """One generated orbit video of an engine run."""

  id: str  # the prompt id, the labels file's video id
  prompt: str
  shard: str  # the videos shard (.npz) that holds it
  index: int  # its row in the shard


def videos_dir(workdir: str) -> str:
  """Where the engine's ``videos`` stage writes its shards."""
  return os.path.join(workdir, "shards", "videos")


def _prompts(workdir: str) -> dict[str, str]:
  path = os.path.join(workdir, "prompts.jsonl")
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {row["id"]: row["prompt"] for row in rows}


def list_videos(workdir: str) -> list[Video]:
  """The run's videos, in shard order.

  Raises:
    FileNotFoundError: ``workdir`` has no video shards (the videos stage has
      not run there).
  """
  directory = videos_dir(workdir)
  shards = sorted(f for f in os.listdir(directory) if _SHARD.match(f)) \
      if os.path.isdir(directory) else []
  if not shards:
    raise FileNotFoundError(f"{workdir}: no orbit videos (shards/videos/videos-*.npz); "
                            "run the engine's videos stage there first")
  prompts = _prompts(workdir)
  videos = []
  for name in shards:
    path = os.path.join(directory, name)
    with np.load(path, allow_pickle=False) as data:
      ids = [str(i) for i in data["ids"]]
    videos += [Video(vid, prompts.get(vid, ""), path, i) for i, vid in enumerate(ids)]
  return videos


def load_videos(shard: str) -> np.ndarray:
  """``[N, F, H, W, 3] uint8``: every video of a videos shard."""
  with np.load(shard, allow_pickle=False) as data:
    return np.asarray(data["videos"])


def load_frames(video: Video) -> np.ndarray:
  """``[F, H, W, 3] uint8``: the video's frames."""
  return load_videos(video.shard)[video.index]


def skipped_path(labels_file: str) -> str:
  """The side file of skipped ids beside ``labels_file``."""
  return labels_file + SKIPPED_SUFFIX


def _has_rows(path: str) -> bool:
  if not os.path.isfile(path):
    return False
  with open(path, encoding="utf-8-sig") as f:
    return bool(f.read().strip())


def read_done(labels_file: str) -> tuple[dict[str, bool], set[str]]:
  """``(labels, skipped ids)`` so far; empty for files that do not exist yet.

  Raises:
    ValueError: a labels file ``quality.read_labels`` refuses (its line named).
  """
  labels = quality.read_labels(labels_file) if _has_rows(labels_file) else {}
  skipped = set()
  if os.path.isfile(skipped_path(labels_file)):
    with open(skipped_path(labels_file)) as f:
      skipped = {line.strip() for line in f if line.strip()}
  return labels, skipped


def next_video(videos: Sequence[Video], labels: dict[str, bool],
               skipped: set[str]) -> Video | None:
  """The first video neither labelled nor skipped (None when all are)."""
  return next((v for v in videos if v.id not in labels and v.id not in skipped), None)


def progress(videos: Sequence[Video], labels: dict[str, bool], skipped: set[str]) -> str:
  """``"2 of 3 labelled (1 good, 1 bad), 0 skipped"`` for this run's videos."""
  mine = [labels[v.id] for v in videos if v.id in labels]
  good = sum(mine)
  skips = sum(1 for v in videos if v.id in skipped and v.id not in labels)
  return (f"{len(mine)} of {len(videos)} labelled ({good} good, {len(mine) - good} bad), "
          f"{skips} skipped")


def _kind(labels_file: str) -> str:
  """The file's format as ``read_labels`` picks it: by suffix, else by its first line."""
  suffix = os.path.splitext(labels_file)[1].lower()
  if suffix in (".jsonl", ".ndjson", ".json"):
    return "jsonl"
  if suffix in (".csv", ".tsv"):
    return suffix[1:]
  first = ""
  if os.path.isfile(labels_file):
    with open(labels_file, encoding="utf-8-sig") as f:
      first = next((line for line in f if line.strip()), "")
  if first.lstrip().startswith("{"):
    return "jsonl"
  return "tsv" if "\t" in first else "csv"


def format_row(labels_file: str, video_id: str, good: bool, new_file: bool) -> str:
  """One label as a line (or, for a new CSV or TSV file, a header and the line)."""
  label = "good" if good else "bad"
  kind = _kind(labels_file)
  if kind == "jsonl":
    return json.dumps({"id": video_id, "label": label}) + "\n"
  buffer = io.StringIO()
  writer = csv.writer(buffer, delimiter="\t" if kind == "tsv" else ",", lineterminator="\n")
  if new_file:
    writer.writerow(["video_id", "label"])
  writer.writerow([video_id, label])
  return buffer.getvalue()


def _append(path: str, text: str) -> None:
  """``path``'s content plus ``text``, written to a temporary file and renamed over it."""
  old = ""
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      old = f.read()
  if old and not old.endswith("\n"):
    old += "\n"
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(old + text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def add_label(labels_file: str, video_id: str, good: bool) -> bool:
  """Adds ``video_id``'s label; False (nothing written) when it is already labelled.

  Raises:
    ValueError: the existing labels file is not one ``read_labels`` reads.
  """
  labels, _ = read_done(labels_file)
  if video_id in labels:
    return False
  _append(labels_file, format_row(labels_file, video_id, good, not _has_rows(labels_file)))
  return True


def add_skip(labels_file: str, video_id: str) -> bool:
  """Records ``video_id`` as skipped; False when it is already labelled or skipped."""
  labels, skipped = read_done(labels_file)
  if video_id in labels or video_id in skipped:
    return False
  _append(skipped_path(labels_file), video_id + "\n")
  return True
