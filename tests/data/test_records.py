"""Record layout, the shard writer (atomic, resumable) and TFDS access."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from vf3d_jax.data import orbits
from vf3d_jax.data import records
from vf3d_jax.data import writer


def _record(index: int, num_views: int = 5, size: int = 8) -> records.MultiViewRecord:
  rng = np.random.default_rng(index)
  sampled = orbits.sample_views(orbits.ViewSpec(num_orbit_views=num_views - 1,
                                                num_random_views=1), rng)
  images = [records.encode_png(rng.integers(0, 256, (size, size, 4), dtype=np.uint8))
            for _ in range(num_views)]
  return records.MultiViewRecord(
      asset_id=f"asset-{index}", caption=f"a red cone number {index} \u2713", source="3d",
      images=images, c2w=sampled["c2w"], intrinsics=sampled["intrinsics"],
      azimuth=sampled["azimuth"], elevation=sampled["elevation"],
      num_orbit_views=num_views - 1, quality=0.5 if index % 2 else math.nan,
      elevation_estimate=float(sampled["orbit_elevation"]))


def _assert_same(a: records.MultiViewRecord, b: records.MultiViewRecord):
  assert (a.asset_id, a.caption, a.source, a.num_orbit_views) == (
      b.asset_id, b.caption, b.source, b.num_orbit_views)
  assert list(a.images) == list(b.images)
  for field in ("c2w", "intrinsics", "azimuth", "elevation"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  np.testing.assert_array_equal([a.quality, a.elevation_estimate],
                                [b.quality, b.elevation_estimate])


def test_record_round_trip():
  record = _record(1)
  parsed = records.parse(records.serialize(record))
  _assert_same(parsed, record)
  image = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
  np.testing.assert_array_equal(records.decode_png(records.encode_png(image)), image)
  rgb = image[..., :3].copy()
  np.testing.assert_array_equal(records.decode_png(records.encode_png(rgb))[..., 3], 255)


def test_bad_records_raise_bad_record_error():
  good = records.serialize(_record(2))
  with pytest.raises(records.BadRecordError):
    records.parse(good[: len(good) // 2])  # truncated
  with pytest.raises(records.BadRecordError):
    records.parse(b"\xff\x00 not a proto")
  with pytest.raises(records.BadRecordError):
    records.parse(good, min_views=6)  # too few views
  inconsistent = _record(3)
  inconsistent.images = list(inconsistent.images)[:-1]
  inconsistent.c2w = inconsistent.c2w[:-1]
  inconsistent.intrinsics = inconsistent.intrinsics[:-1]
  inconsistent.azimuth = inconsistent.azimuth[:-1]
  inconsistent.elevation = inconsistent.elevation[:-1]
  inconsistent_bytes = records.serialize(inconsistent)
  # Re-append one camera to make the counts disagree.
  from tensorflow_datasets.proto import tf_example_generated_pb2 as example_pb2
  example = example_pb2.Example.FromString(inconsistent_bytes)
  example.features.feature["views/c2w"].float_list.value.extend(np.eye(4).reshape(-1))
  with pytest.raises(records.BadRecordError, match="inconsistent"):
    records.parse(example.SerializeToString())
  with pytest.raises(records.BadRecordError):
    records.decode_png(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)


def _write(directory, count, per_shard, file_format="array_record", fail_at=None):
  sink_writer = writer.ShardedWriter(str(directory), "assets", num_examples=count,
                                     examples_per_shard=per_shard, file_format=file_format,
                                     fingerprint={"seed": 0})
  for shard in sink_writer.pending_shards():
    with sink_writer.open_shard(shard) as sink:
      for index in sink_writer.shard_range(shard):
        if index == fail_at:
          raise RuntimeError("crash")
        sink.write(records.serialize(_record(index)))
  return sink_writer


def _read_all(folder):
  from array_record.python import array_record_module
  out = []
  for name in sorted(os.listdir(folder)):
    if ".array_record-" in name:
      reader = array_record_module.ArrayRecordReader(os.path.join(folder, name))
      out += [records.parse(r) for r in reader.read_all()]
      reader.close()
  return out


def test_writer_survives_a_crash_and_resumes(tmp_path):
  with pytest.raises(RuntimeError, match="crash"):
    _write(tmp_path, 10, 4, fail_at=5)
  folder = tmp_path / "assets" / "1.0.0"
  names = sorted(os.listdir(folder))
  # Shard 0 complete; shard 1 died half-way and left nothing behind.
  assert names == ["assets-train.array_record-00000-of-00003", writer.MANIFEST]
  assert [r.asset_id for r in _read_all(folder)] == [f"asset-{i}" for i in range(4)]
  resumed = writer.ShardedWriter(str(tmp_path), "assets", num_examples=10, examples_per_shard=4,
                                 fingerprint={"seed": 0})
  assert resumed.pending_shards() == [1, 2]
  _write(tmp_path, 10, 4).finalize()
  got = _read_all(folder)
  assert len(got) == 10
  for index, record in enumerate(got):
    _assert_same(record, _record(index))
  # A different plan is refused rather than mixed in, naming what differs.
  with pytest.raises(ValueError, match="different dataset plan") as refused:
    writer.ShardedWriter(str(tmp_path), "assets", num_examples=12, examples_per_shard=4,
                         fingerprint={"seed": 1, "views": {"radius": 2.0}})
  assert str(refused.value) == (
      f"{folder} holds 3 complete shard(s) of a different dataset plan (num_examples was 10, "
      "now 12; seed was 0, now 1; views.radius was missing, now 2.0); use another folder or "
      "name, or delete that folder to start again")


def test_plan_differences_name_fingerprint_fields_once():
  old = {"name": "a", "examples_per_shard": 4, "fingerprint": {"examples_per_shard": 4,
                                                               "views": {"fov": 50.0}}}
  new = {"name": "a", "examples_per_shard": 8, "fingerprint": {"examples_per_shard": 8,
                                                               "views": {"fov": 60.0}}}
  assert writer.plan_differences(old, new) == [
      "examples_per_shard was 4, now 8", "views.fov was 50.0, now 60.0"]
  # A fingerprint field that differs on its own keeps its prefix.
  new["examples_per_shard"] = 4
  assert writer.plan_differences(old, new)[0] == "fingerprint.examples_per_shard was 4, now 8"
  assert writer.plan_differences(old, old) == []


def test_a_run_that_completes_no_shard_leaves_nothing_and_blocks_nothing(tmp_path):
  root = tmp_path / "out"
  with pytest.raises(RuntimeError, match="crash"):
    _write(root, 4, 2, fail_at=1)
  assert not root.exists()
  # The writer makes nothing before a shard is complete.
  writer.ShardedWriter(str(root), "assets", num_examples=4, examples_per_shard=2)
  assert not root.exists()
  # A manifest of another plan that lists no complete shard (what a crash
  # before the first shard used to leave) is taken over.
  folder = root / "assets" / "1.0.0"
  folder.mkdir(parents=True)
  writer.write_json_atomic(str(folder / writer.MANIFEST), {
      "plan": {"name": "assets", "fingerprint": {"seed": 5}}, "complete": {}})
  _write(root, 4, 2).finalize()
  assert len(_read_all(folder)) == 4
  with open(folder / writer.MANIFEST) as file:
    assert json.load(file)["plan"]["fingerprint"] == {"seed": 0}


def test_a_file_in_the_way_is_not_a_directory(tmp_path):
  for data_dir, in_the_way in ((tmp_path / "file", tmp_path / "file"),
                               (tmp_path, tmp_path / "assets")):
    in_the_way.write_text("")
    with pytest.raises(NotADirectoryError, match="^" + re.escape(f"{in_the_way} is not a dir")):
      writer.ShardedWriter(str(data_dir), "assets", num_examples=1, examples_per_shard=1)


def test_shards_may_leave_out_examples_when_asked(tmp_path):
  sink_writer = writer.ShardedWriter(str(tmp_path), "assets", num_examples=5,
                                     examples_per_shard=2)
  with pytest.raises(RuntimeError, match="shard 0: wrote 1 records, expected 2"):
    with sink_writer.open_shard(0) as sink:
      sink.write(records.serialize(_record(0)))
  for shard in sink_writer.pending_shards():
    with sink_writer.open_shard(shard, allow_fewer=True) as sink:
      for index in sink_writer.shard_range(shard):
        if index != 2:  # the caller skips example 2
          sink.write(records.serialize(_record(index)))
  folder = sink_writer.finalize()
  assert (sink_writer.num_written, sink_writer.num_skipped) == (4, 1)
  resumed = writer.ShardedWriter(str(tmp_path), "assets", num_examples=5, examples_per_shard=2)
  assert (resumed.complete, resumed.num_written, resumed.num_skipped) == (True, 4, 1)
  import tensorflow_datasets as tfds
  source = tfds.builder_from_directory(folder).as_data_source()["train"]
  assert [source[i]["id"].decode() for i in range(len(source))] == [
      "asset-0", "asset-1", "asset-3", "asset-4"]


def test_a_killed_writer_leaves_only_complete_shards(tmp_path):
  # A process killed mid-shard (no cleanup at all) leaves a temporary file;
  # the next writer removes it and rewrites that shard.
  script = f"""
import os, sys
sys.path.insert(0, {os.getcwd()!r})
from vf3d_jax.data import writer
w = writer.ShardedWriter({str(tmp_path)!r}, "assets", num_examples=4, examples_per_shard=2,
                         fingerprint={{"seed": 0}})
with w.open_shard(0) as sink:
  sink.write(b"record 0")
  sink.write(b"record 1")
with w.open_shard(1) as sink:
  sink.write(b"record 2")
  os._exit(9)
"""
  done = subprocess.run([sys.executable, "-c", script], timeout=60)
  assert done.returncode == 9
  folder = tmp_path / "assets" / "1.0.0"
  assert any(name.endswith(".incomplete") for name in os.listdir(folder))
  resumed = writer.ShardedWriter(str(tmp_path), "assets", num_examples=4, examples_per_shard=2,
                                 fingerprint={"seed": 0})
  assert resumed.pending_shards() == [1]
  assert not any(name.endswith(".incomplete") for name in os.listdir(folder))
  assert writer.count_records(resumed.shard_path(0)) == 2


def test_tfds_data_source_reads_the_folder(tmp_path):
  import tensorflow_datasets as tfds
  folder = _write(tmp_path, 5, 2).finalize()
  source = tfds.data_source("assets", data_dir=str(tmp_path), split="train")
  assert len(source) == 5
  builder_source = tfds.builder_from_directory(folder).as_data_source()["train"]
  # Shards without metadata (written by other means) get it on demand.
  bare = _write(tmp_path / "bare", 5, 2).directory
  assert not os.path.exists(os.path.join(bare, "dataset_info.json"))
  assert len(writer.tfds_builder(bare).as_data_source()["train"]) == 5
  for index in (0, 3, 4):
    expected = _record(index)
    for example in (source[index], builder_source[index]):
      assert example["id"].decode() == expected.asset_id
      assert example["caption"].decode() == expected.caption
      assert int(example["num_orbit_views"]) == expected.num_orbit_views
      np.testing.assert_array_equal(np.stack(example["views"]["c2w"]), expected.c2w)
      for image, png in zip(example["views"]["rgba"], expected.images):
        np.testing.assert_array_equal(image, records.decode_png(png))


def test_tfrecord_output_is_valid(tmp_path):
  assert writer.crc32c(b"123456789") == 0xE3069283  # The CRC-32C check value.
  payload = os.urandom(5000)
  slow = 0xFFFFFFFF
  for byte in payload:  # Bitwise reference.
    slow ^= byte
    for _ in range(8):
      slow = (slow >> 1) ^ (0x82F63B78 if slow & 1 else 0)
  assert writer.crc32c(payload) == slow ^ 0xFFFFFFFF
  sink_writer = _write(tmp_path, 3, 2, file_format="tfrecord")
  sink_writer.finalize()
  import grain
  shard = sink_writer.shard_path(0)
  assert shard.endswith("assets-train.tfrecord-00000-of-00002")
  read = list(writer.read_tfrecord(shard, verify=True))
  assert read == list(grain.experimental.TFRecordIterDataset(shard))
  for index, data in enumerate(read):
    _assert_same(records.parse(data), _record(index))
