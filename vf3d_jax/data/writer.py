"""Crash-safe, resumable sharded writer of records, laid out as a TFDS dataset.

Files go to ``<data_dir>/<name>/<version>/``:

* shards ``<name>-<split>.<format>-NNNNN-of-MMMMM`` (``array_record``, or
  ``tfrecord`` on request), example ``i`` in shard ``i // examples_per_shard``;
* ``vf3d_manifest.json``: the plan (counts, format, a fingerprint of what is
  being written) and the shards that are complete, written when the first
  shard is complete (a run that fails before that leaves nothing behind);
* once every shard is complete, TFDS metadata (``dataset_info.json``,
  ``features.json``), so ``tfds.data_source(name, data_dir=data_dir)`` and
  ``tfds.builder_from_directory(<that folder>)`` read it (random access needs
  ArrayRecord).

A shard is written to a temporary file, checked, ``fsync``-ed and renamed into
place; only then does the manifest (itself replaced atomically) list it. A
crash therefore leaves complete shards and a stray temporary file, which the
next run deletes before it writes the missing shards again. A folder whose
manifest lists complete shards of another plan is refused, naming the fields
that differ; one that lists none is taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
from typing import Any, Iterator

import numpy as np

MANIFEST = "vf3d_manifest.json"
FILE_FORMATS = ("array_record", "tfrecord")
_TEMP_SUFFIX = ".incomplete"


# --- TFRecord framing (CRC-32C, no TensorFlow) -------------------------------

def _crc32c_table() -> np.ndarray:
  table = np.arange(256, dtype=np.uint32)
  for _ in range(8):
    table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1)
  return table.astype(np.uint32)


_TABLE = _crc32c_table()
_BLOCK = 1024
_ZERO_SHIFT = None  # Lazily built tables of "advance the register over _BLOCK zero bytes".


def _zero_shift_tables() -> np.ndarray:
  """``[4, 256]``: register contribution of each byte of a register after
  ``_BLOCK`` zero bytes (the map is linear over GF(2))."""
  global _ZERO_SHIFT
  if _ZERO_SHIFT is None:
    registers = (np.arange(256, dtype=np.uint32)[None, :]
                 << (8 * np.arange(4, dtype=np.uint32))[:, None]).reshape(-1)
    for _ in range(_BLOCK):
      registers = _TABLE[registers & 0xFF] ^ (registers >> 8)
    _ZERO_SHIFT = registers.reshape(4, 256)
  return _ZERO_SHIFT


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of ``data``.

  Blocks of 1 KiB are processed in parallel with numpy from a zero register,
  then chained by the linear map that advances a register over a block.
  """
  register = 0xFFFFFFFF
  full = len(data) // _BLOCK * _BLOCK
  if full:
    blocks = np.frombuffer(data, np.uint8, count=full).reshape(-1, _BLOCK)
    partial = np.zeros(blocks.shape[0], np.uint32)
    for column in blocks.T:
      partial = _TABLE[(partial ^ column) & 0xFF] ^ (partial >> 8)
    shift = _zero_shift_tables()
    for value in partial.tolist():
      register = (int(shift[0, register & 0xFF]) ^ int(shift[1, (register >> 8) & 0xFF])
                  ^ int(shift[2, (register >> 16) & 0xFF]) ^ int(shift[3, register >> 24])
                  ^ value)
  table = _TABLE.tolist()
  for byte in data[full:]:
    register = table[(register ^ byte) & 0xFF] ^ (register >> 8)
  return register ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class TFRecordFileWriter:
  """Writes the TFRecord framing: length, masked CRC, data, masked CRC."""

  def __init__(self, path: str):
    self._file = open(path, "wb")

  def write(self, data: bytes) -> None:
    length = struct.pack("<Q", len(data))
    self._file.write(length + struct.pack("<I", _masked_crc(length)))
    self._file.write(data + struct.pack("<I", _masked_crc(data)))

  def close(self) -> None:
    self._file.flush()
    os.fsync(self._file.fileno())
    self._file.close()


def read_tfrecord(path: str, verify: bool = True) -> Iterator[bytes]:
  """Records of a TFRecord file (for tests and tools; training reads ArrayRecord)."""
  with open(path, "rb") as file:
    while header := file.read(12):
      if len(header) < 12:
        raise ValueError(f"{path}: truncated header")
      (length,) = struct.unpack("<Q", header[:8])
      if verify and struct.unpack("<I", header[8:])[0] != _masked_crc(header[:8]):
        raise ValueError(f"{path}: bad length checksum")
      data = file.read(length)
      footer = file.read(4)
      if len(data) < length or len(footer) < 4:
        raise ValueError(f"{path}: truncated record")
      if verify and struct.unpack("<I", footer)[0] != _masked_crc(data):
        raise ValueError(f"{path}: bad data checksum")
      yield data


# --- Atomic file helpers ----------------------------------------------------

def _fsync_directory(directory: str) -> None:
  descriptor = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(descriptor)
  finally:
    os.close(descriptor)


def write_json_atomic(path: str, content: Any) -> None:
  """Writes JSON so that ``path`` holds either the old or the new content."""
  temporary = path + _TEMP_SUFFIX
  with open(temporary, "w") as file:
    json.dump(content, file, indent=1, sort_keys=True)
    file.flush()
    os.fsync(file.fileno())
  os.replace(temporary, path)
  _fsync_directory(os.path.dirname(path) or ".")


class _ArrayRecordFileWriter:
  def __init__(self, path: str):
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    # One record a group: random access without decompressing neighbours;
    # PNGs do not compress further.
    self._writer = array_record_module.ArrayRecordWriter(path, "group_size:1,uncompressed")
    self._path = path

  def write(self, data: bytes) -> None:
    self._writer.write(data)

  def close(self) -> None:
    self._writer.close()
    with open(self._path, "rb+") as file:
      os.fsync(file.fileno())


def count_records(path: str, file_format: str = "array_record") -> int:
  """Records in a shard file; raises if it cannot be read."""
  if file_format == "tfrecord":
    return sum(1 for _ in read_tfrecord(path, verify=False))
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return int(reader.num_records())
  finally:
    reader.close()


# --- The sharded writer -----------------------------------------------------

class _CountingSink:
  """A record file writer that counts what it is given."""

  def __init__(self, sink):
    self._sink = sink
    self.count = 0

  def write(self, data: bytes) -> None:
    self._sink.write(data)
    self.count += 1

  def close(self) -> None:
    self._sink.close()


def check_directory(directory: str) -> None:
  """Raises ``NotADirectoryError`` when a part of ``directory`` that exists is not a folder."""
  path = os.path.abspath(directory)
  while not os.path.lexists(path):
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise NotADirectoryError(f"{path} is not a directory (output folder {directory})")


def _make_directories(directory: str) -> list[str]:
  """``os.makedirs(directory)``; returns the folders it made, outermost first."""
  missing = []
  path = os.path.abspath(directory)
  while not os.path.exists(path):
    missing.append(path)
    path = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  return missing[::-1]


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


_MISSING = object()


def _short(value: Any, limit: int = 60) -> str:
  text = "missing" if value is _MISSING else json.dumps(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def plan_differences(old: dict, new: dict) -> list[str]:
  """``["<field> was <old>, now <new>", ...]`` for the fields in which two plans differ.

  Fields of the fingerprint are named without a prefix (``resolution``, not
  ``fingerprint.resolution``) unless the plan has a field of that name; one
  that differs just like the plan's field of that name is named once.
  """
  def fields(plan):
    flat = _flatten({k: v for k, v in plan.items() if k != "fingerprint"})
    for key, value in _flatten(plan.get("fingerprint") or {}).items():
      flat[f"fingerprint.{key}" if key in plan else key] = value
    return flat
  old_fields, new_fields = fields(old), fields(new)
  pair = lambda k: (old_fields.get(k, _MISSING), new_fields.get(k, _MISSING))
  names = list(new_fields) + [k for k in old_fields if k not in new_fields]
  differ = [k for k in names if pair(k)[0] != pair(k)[1]]
  differ = [k for k in differ if not (k.startswith("fingerprint.") and
                                      k.split(".", 1)[1] in differ and
                                      pair(k) == pair(k.split(".", 1)[1]))]
  return [f"{k} was {_short(pair(k)[0])}, now {_short(pair(k)[1])}" for k in differ]


class ShardedWriter:
  """Writes ``num_examples`` records in fixed shards, resumably.

  Usage::

    writer = ShardedWriter(data_dir, "procedural", num_examples=1000,
                           examples_per_shard=100, fingerprint={"seed": 0})
    for shard in writer.pending_shards():
      with writer.open_shard(shard) as sink:
        for index in writer.shard_range(shard):
          sink.write(serialized_record(index))
    writer.finalize()
  """

  def __init__(self, data_dir: str, name: str, *, num_examples: int, examples_per_shard: int,
               split: str = "train", file_format: str = "array_record",
               version: str = "1.0.0", fingerprint: dict | None = None,
               description: str = ""):
    """Opens (or resumes) a dataset folder.

    Args:
      data_dir: root folder; the dataset goes to ``data_dir/name/version``.
      name: dataset name (letters, digits, underscores).
      num_examples: total records.
      examples_per_shard: records per shard (the last may hold fewer).
      split: TFDS split name.
      file_format: ``array_record`` or ``tfrecord``.
      version: TFDS version string.
      fingerprint: JSON-able description of the content (e.g. the config);
        resuming with a different one is refused.
      description: TFDS description.

    Raises:
      ValueError: the folder holds complete shards of a different plan.
      NotADirectoryError: a part of the folder's path is a file.
    """
    if file_format not in FILE_FORMATS:
      raise ValueError(f"file_format must be one of {FILE_FORMATS}, got {file_format!r}")
    if num_examples < 1 or examples_per_shard < 1:
      raise ValueError("num_examples and examples_per_shard must be positive")
    self.name, self.split, self.file_format = name, split, file_format
    self.description = description
    self.directory = os.path.join(data_dir, name, version)
    check_directory(self.directory)
    self.num_examples = int(num_examples)
    self.examples_per_shard = int(examples_per_shard)
    self.num_shards = -(-self.num_examples // self.examples_per_shard)
    plan = {"name": name, "split": split, "file_format": file_format, "version": version,
            "num_examples": self.num_examples, "examples_per_shard": self.examples_per_shard,
            "fingerprint": fingerprint or {}}
    # Round-trip through JSON so tuples and lists compare equal.
    self._plan = json.loads(json.dumps(plan, sort_keys=True))
    self._complete = {}
    manifest_path = os.path.join(self.directory, MANIFEST)
    if os.path.exists(manifest_path):
      with open(manifest_path) as file:
        manifest = json.load(file)
      complete = {int(k): v for k, v in manifest["complete"].items()}
      if manifest["plan"] == self._plan:
        self._complete = complete
      elif complete:
        differences = "; ".join(plan_differences(manifest["plan"], self._plan))
        raise ValueError(
            f"{self.directory} holds {len(complete)} complete shard(s) of a different dataset "
            f"plan ({differences}); use another folder or name, or delete that folder to "
            "start again")
      # A manifest of another plan without a complete shard is replaced by
      # this plan's once its first shard is complete.
    if os.path.isdir(self.directory):
      for entry in os.listdir(self.directory):
        if entry.endswith(_TEMP_SUFFIX):
          os.remove(os.path.join(self.directory, entry))
    # The manifest is the truth: a shard file it does not list (a crash
    # between the rename and the manifest update) counts as missing and is
    # written again.

  def _save_manifest(self) -> None:
    write_json_atomic(os.path.join(self.directory, MANIFEST),
                      {"plan": self._plan, "complete": {str(k): v for k, v in
                                                         sorted(self._complete.items())}})

  def shard_path(self, shard: int) -> str:
    return os.path.join(self.directory, f"{self.name}-{self.split}.{self.file_format}-"
                        f"{shard:05d}-of-{self.num_shards:05d}")

  def shard_range(self, shard: int) -> range:
    start = shard * self.examples_per_shard
    return range(start, min(start + self.examples_per_shard, self.num_examples))

  def pending_shards(self) -> list[int]:
    return [s for s in range(self.num_shards) if s not in self._complete]

  @property
  def complete(self) -> bool:
    return not self.pending_shards()

  @property
  def num_written(self) -> int:
    """Records in the complete shards."""
    return sum(v["num_examples"] for v in self._complete.values())

  @property
  def num_skipped(self) -> int:
    """Examples the complete shards left out (see ``open_shard(allow_fewer=True)``)."""
    return sum(v.get("skipped", 0) for v in self._complete.values())

  @contextlib.contextmanager
  def open_shard(self, shard: int, allow_fewer: bool = False):
    """Context manager yielding a sink with ``write(bytes)``.

    On a clean exit the shard must hold exactly ``len(shard_range(shard))``
    records (at most that many with ``allow_fewer``: examples the caller
    skipped, counted in the manifest); it is then made durable and listed.
    On an exception the temporary file is removed (and the folders this
    writer made, while no shard is complete) and the exception propagates.
    """
    made = _make_directories(self.directory)
    final = self.shard_path(shard)
    temporary = final + _TEMP_SUFFIX
    sink = _CountingSink(TFRecordFileWriter(temporary) if self.file_format == "tfrecord"
                         else _ArrayRecordFileWriter(temporary))
    closed = False
    try:
      yield sink
      sink.close()
      closed = True
      expected = len(self.shard_range(shard))
      found = count_records(temporary, self.file_format)
      if found != sink.count or found > expected or (found < expected and not allow_fewer):
        raise RuntimeError(f"shard {shard}: wrote {found} records, expected {expected}")
      os.replace(temporary, final)
      _fsync_directory(self.directory)
    except BaseException:
      if not closed:
        with contextlib.suppress(Exception):
          sink.close()
      with contextlib.suppress(FileNotFoundError):
        os.remove(temporary)
      if not self._complete:
        for directory in reversed(made):
          with contextlib.suppress(OSError):
            os.rmdir(directory)  # Only while empty.
      raise
    entry = {"num_examples": found, "num_bytes": os.path.getsize(final)}
    if found < expected:
      entry["skipped"] = expected - found
    self._complete[shard] = entry
    self._save_manifest()

  def finalize(self) -> str:
    """Writes the TFDS metadata once every shard is complete.

    Returns:
      The dataset folder.

    Raises:
      RuntimeError: shards are missing.
    """
    if not self.complete:
      raise RuntimeError(f"{len(self.pending_shards())} shards missing in {self.directory}")
    write_tfds_metadata(self.directory, self.split,
                        [self._complete[s]["num_examples"] for s in range(self.num_shards)],
                        sum(v["num_bytes"] for v in self._complete.values()),
                        self.description)
    return self.directory


def write_tfds_metadata(directory: str, split: str, shard_lengths: list[int], num_bytes: int,
                        description: str = "") -> None:
  """Makes a folder of shards a TFDS dataset (``dataset_info.json`` etc.)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from vf3d_jax.data import records  # pylint: disable=g-import-not-at-top
  split_info = tfds.core.SplitInfo(name=split, shard_lengths=list(shard_lengths),
                                   num_bytes=int(num_bytes), filename_template=None)
  tfds.folder_dataset.write_metadata(
      data_dir=directory, features=records.tfds_features(), split_infos=[split_info],
      filename_template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}", check_data=False,
      description=description or "Multi-view renders of 3D assets (vf3d_jax records).")


def tfds_builder(directory: str, split: str = "train"):
  """A TFDS builder over a folder of record shards.

  The folder's shards must be named ``<name>-<split>.<format>-NNNNN-of-MMMMM``.
  When it has no TFDS metadata yet (shards written by other means), the
  records are counted and the metadata written first. Then
  ``tfds_builder(folder).as_data_source()[split]`` gives random access, and
  ``tfds.data_source(name, data_dir=...)`` works when the folder is
  ``<data_dir>/<name>/<version>``.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if not os.path.exists(os.path.join(directory, "dataset_info.json")):
    pattern = re.compile(rf".+-{re.escape(split)}\.(array_record|tfrecord)-\d{{5}}-of-\d{{5}}")
    shards = sorted(f for f in os.listdir(directory) if pattern.fullmatch(f))
    if not shards:
      raise FileNotFoundError(f"no shards of split {split!r} in {directory}")
    file_format = pattern.fullmatch(shards[0]).group(1)
    paths = [os.path.join(directory, f) for f in shards]
    write_tfds_metadata(directory, split, [count_records(p, file_format) for p in paths],
                        sum(os.path.getsize(p) for p in paths))
  return tfds.builder_from_directory(directory)
