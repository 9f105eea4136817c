"""The Grain loader: content, determinism, state, mixing and bad data."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from vf3d_jax.data import orbits
from vf3d_jax.data import pipeline
from vf3d_jax.data import records
from vf3d_jax.data import writer
from vf3d_jax.rendering import cameras

SIZE = 16  # stored image side
VIEWS = 6


def _pattern(view: int) -> np.ndarray:
  """Pixel (y, x) of view v: red = 16 x, green = 16 y, blue = 10 v; the four
  right-most columns are transparent."""
  y, x = np.mgrid[:SIZE, :SIZE]
  image = np.stack([16 * x, 16 * y, np.full_like(x, 10 * view), np.full_like(x, 255)], -1)
  image[:, -4:, 3] = 0
  return image.astype(np.uint8)


def _record(index: int, source: str = "3d", num_views: int = VIEWS, images=None) -> bytes:
  sampled = orbits.sample_views(orbits.ViewSpec(num_orbit_views=num_views, num_random_views=0),
                                np.random.default_rng(index))
  images = [_pattern(v) for v in range(num_views)] if images is None else images
  return records.serialize(records.MultiViewRecord(
      asset_id=f"{source}-{index}", caption="a test asset", source=source,
      images=[records.encode_png(image) for image in images],
      c2w=sampled["c2w"], intrinsics=sampled["intrinsics"], azimuth=sampled["azimuth"],
      elevation=sampled["elevation"], num_orbit_views=num_views))


def _dataset(directory, name, payloads, per_shard=4) -> str:
  sink_writer = writer.ShardedWriter(str(directory), name, num_examples=len(payloads),
                                     examples_per_shard=per_shard)
  for shard in sink_writer.pending_shards():
    with sink_writer.open_shard(shard) as sink:
      for index in sink_writer.shard_range(shard):
        sink.write(payloads[index])
  return sink_writer.finalize()


def _config(*paths_and_weights, **overrides):
  config = pipeline.default_config()
  config.datasets = [{"path": p, "weight": w} for p, w in paths_and_weights]
  config.batch_size = 2
  config.num_workers = 0
  config.read_threads = 1
  config.input_resolution = SIZE
  config.render_resolution = SIZE
  config.crop_size = 8
  config.num_render_views = 3
  config.shard_index = 0
  config.shard_count = 1
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return _dataset(tmp_path_factory.mktemp("good"), "good", [_record(i) for i in range(10)])


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_batches_hold_the_right_views_cameras_and_crops(folder):
  batch = next(iter(pipeline.make_dataset(_config((folder, 1.0)))))
  shapes = {k: v.shape for k, v in batch.items()}
  assert shapes == {
      "source_image": (2, SIZE, SIZE, 3), "source_camera": (2, 16),
      "render_c2w": (2, 3, 4, 4), "render_intrinsics": (2, 3, 4),
      "render_rgb": (2, 3, 8, 8, 3), "render_mask": (2, 3, 8, 8), "crop": (2, 3, 3),
      "render_resolution": (2,), "background": (2, 3), "scale": (2,), "dataset_index": (2,)}
  assert all(v.dtype in (np.float32, np.int32) for v in batch.values())
  # The source camera is exactly the released model's default camera.
  np.testing.assert_allclose(batch["source_camera"], np.tile(cameras.DEFAULT_SOURCE_CAMERA, (2, 1)),
                             atol=1e-5)
  np.testing.assert_allclose(batch["scale"], 1 / orbits.fit_distance(orbits.DEFAULT_FOV_DEGREES),
                             rtol=1e-5)
  for b in range(2):
    source_view = round(batch["source_image"][b, 0, 0, 2] * 255 / 10)
    seen = []
    for n in range(3):
      x, y, size = batch["crop"][b, n]
      rgb, mask = batch["render_rgb"][b, n], batch["render_mask"][b, n]
      opaque = mask > 0.5
      view = round(rgb[opaque][0, 2] * 255 / 10)
      seen.append(view)
      expected = _pattern(view)[y:y + size, x:x + size] / 255.0
      np.testing.assert_allclose(mask, expected[..., 3], atol=1e-6)
      composite = expected[..., :3] * expected[..., 3:] + (1 - expected[..., 3:])  # white
      np.testing.assert_allclose(rgb, composite, atol=1e-6)
      # Each render camera relates to the source camera as in the record.
      if n == 0:
        np.testing.assert_allclose(batch["render_c2w"][b, 0],
                                   cameras.split_conditioning(batch["source_camera"][b], xp=np)[0],
                                   atol=1e-6)
    assert seen[0] == source_view and len(set(seen)) == 3
    assert batch["render_resolution"][b] == SIZE


def test_relative_poses_match_the_record(folder):
  config = _config((folder, 1.0), batch_size=1)
  batch = next(iter(pipeline.make_dataset(config)))
  views_seen = [round(batch["render_rgb"][0, n][batch["render_mask"][0, n] > 0.5][0, 2] * 255 / 10)
                for n in range(3)]
  # Find the record by matching relative poses against each candidate.
  relative = np.linalg.inv(batch["render_c2w"][0, 0]) @ batch["render_c2w"][0, 1]
  matches = 0
  for index in range(10):
    c2w = records.parse(_record(index)).c2w.astype(np.float64)
    original = np.linalg.inv(c2w[views_seen[0]]) @ c2w[views_seen[1]]
    if np.allclose(relative[:3, :3], original[:3, :3], atol=1e-5):
      np.testing.assert_allclose(relative[:3, 3], batch["scale"][0] * original[:3, 3], atol=1e-5)
      matches += 1
  assert matches >= 1


def test_same_seed_same_batches_and_state_restores_mid_epoch(folder):
  config = _config((folder, 1.0))
  first = _take(iter(pipeline.make_dataset(config)), 4)
  _assert_batches_equal(first, _take(iter(pipeline.make_dataset(config)), 4))
  config.seed = 1
  other = _take(iter(pipeline.make_dataset(config)), 4)
  assert not all(np.array_equal(a["source_image"], b["source_image"]) and
                 np.array_equal(a["crop"], b["crop"]) for a, b in zip(first, other))
  config.seed = 0
  iterator = iter(pipeline.make_dataset(config))
  _take(iterator, 3)  # 6 of 10 records: mid-epoch
  state = iterator.get_state()
  expected = _take(iterator, 5)  # crosses into the second epoch
  restored = iter(pipeline.make_dataset(config))
  restored.set_state(state)
  _assert_batches_equal(expected, _take(restored, 5))


def test_two_workers_are_deterministic_and_restorable(folder):
  config = _config((folder, 1.0), num_workers=2)
  iterator = iter(pipeline.make_dataset(config))
  head = _take(iterator, 2)
  state = iterator.get_state()
  tail = _take(iterator, 3)
  again = iter(pipeline.make_dataset(config))
  _assert_batches_equal(head, _take(again, 2))
  _take(again, 1)
  again.set_state(state)
  _assert_batches_equal(tail, _take(again, 3))


def test_mixing_follows_the_weights(folder, tmp_path):
  synthetic = _dataset(tmp_path, "synthetic", [_record(i, "synthetic") for i in range(7)])
  config = _config((folder, 3.0), (synthetic, 1.0), batch_size=10, num_render_views=1,
                   background="random", random_background_prob=1.0)
  batches = _take(iter(pipeline.make_dataset(config)), 20)
  index = np.concatenate([b["dataset_index"] for b in batches])
  assert abs(np.mean(index == 0) - 0.75) < 0.05
  # Random backgrounds: one colour per sample, shared by source and targets.
  backgrounds = np.concatenate([b["background"] for b in batches])
  assert len(np.unique(backgrounds[:, 0])) > 100
  b = batches[0]
  transparent = b["render_mask"][0, 0] == 0
  np.testing.assert_allclose(b["render_rgb"][0, 0][transparent],
                             np.broadcast_to(b["background"][0], (transparent.sum(), 3)), atol=1e-6)
  np.testing.assert_allclose(b["source_image"][0, 0, -1], b["background"][0], atol=1e-6)


def _bad_payloads():
  good = [_record(i) for i in range(6)]
  corrupt_png = records.parse(_record(50))
  corrupt_png.images = [b"\x89PNG\r\n\x1a\n garbage"] * VIEWS
  truncated = _record(51)[:300]
  too_few_views = _record(52, num_views=2)
  return good[:2] + [records.serialize(corrupt_png)] + good[2:4] + [truncated] + good[4:] + [
      too_few_views]


def test_bad_records_are_skipped_and_counted_or_raise_in_strict_mode(tmp_path):
  folder = _dataset(tmp_path, "bad", _bad_payloads())
  config = _config((folder, 1.0), batch_size=1, num_epochs=1, drop_remainder=False)
  before = sum(pipeline.bad_record_counts().values())
  examples = list(pipeline.make_dataset(config))
  assert len(examples) == 6
  assert sum(pipeline.bad_record_counts().values()) - before == 3
  config.strict = True
  with pytest.raises(Exception, match="bad record"):
    list(pipeline.make_dataset(config))
  # Records with another view count than `expected_views` are bad too.
  config.strict = False
  config.expected_views = VIEWS + 1
  before = sum(pipeline.bad_record_counts().values())
  assert not list(pipeline.make_dataset(config))
  assert sum(pipeline.bad_record_counts().values()) - before == 9


def test_truncated_shards_are_skipped_or_raise(folder, tmp_path):
  copy = tmp_path / "copy"
  shutil.copytree(folder, copy)
  shard = sorted(p for p in os.listdir(copy) if ".array_record-" in p)[0]
  path = copy / shard
  path.write_bytes(path.read_bytes()[:1000])
  config = _config((str(copy), 1.0), batch_size=1, num_epochs=1, drop_remainder=False)
  assert len(list(pipeline.make_dataset(config))) == 6  # 10 records minus the lost shard's 4
  config.strict = True
  with pytest.raises(records.BadRecordError, match="truncated"):
    pipeline.make_dataset(config)


@contextlib.contextmanager
def _deadline(seconds):
  def fail(*_):
    raise TimeoutError(f"no answer in {seconds} s")
  previous = signal.signal(signal.SIGALRM, fail)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_dataset_of_only_bad_records_raises_instead_of_hanging(tmp_path):
  # (Many records: grain's index shuffle is slow on tiny datasets.)
  folder = _dataset(tmp_path, "junk", [b"junk"] * 500, per_shard=500)
  config = _config((folder, 1.0))  # repeats forever
  with _deadline(60), pytest.raises(Exception, match="filter"):
    next(iter(pipeline.make_dataset(config)))


def test_strict_errors_in_worker_processes_reach_the_caller(tmp_path):
  folder = _dataset(tmp_path, "bad", _bad_payloads())
  script = f"""
import sys
sys.path.insert(0, {os.getcwd()!r})
from vf3d_jax.data import pipeline

if __name__ == "__main__":
  config = pipeline.default_config()
  config.datasets = [{{"path": {folder!r}, "weight": 1.0}}]
  config.update(dict(batch_size=1, num_workers=2, read_threads=1, input_resolution=16,
                     render_resolution=16, crop_size=8, num_render_views=3, strict=True,
                     shard_index=0, shard_count=1))
  for _ in pipeline.make_dataset(config):
    pass
"""
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=120)
  assert done.returncode != 0
  assert "BadRecordError" in done.stderr or "bad record" in done.stderr


def test_shrunk_crops_are_block_means_of_the_stored_pixels():
  config = _config(("unused", 1.0), render_resolution=SIZE // 2, crop_size=4,
                   input_resolution=SIZE // 4, background="random", random_background_prob=1.0)
  make = pipeline.MakeExample(config)
  example = make((0, 0, _record(3)), np.random.default_rng(5))
  background = example["background"]
  for n in range(3):
    x, y, size = example["crop"][n]
    view = round(example["render_rgb"][n][example["render_mask"][n] > 0.99][0, 2] * 255 / 10)
    pattern = _pattern(view) / 255.0
    full = pattern[..., :3] * pattern[..., 3:] + background * (1 - pattern[..., 3:])
    block_mean = lambda img: img.reshape(SIZE // 2, 2, SIZE // 2, 2, -1).mean(axis=(1, 3))
    expected_rgb = block_mean(full)[y:y + size, x:x + size]
    expected_alpha = block_mean(pattern[..., 3:])[y:y + size, x:x + size, 0]
    np.testing.assert_allclose(example["render_rgb"][n], expected_rgb, atol=1e-6)
    np.testing.assert_allclose(example["render_mask"][n], expected_alpha, atol=1e-6)
  assert example["source_image"].shape == (SIZE // 4, SIZE // 4, 3)
  # A non-integer shrink goes through PIL's filter: same shapes, sane values.
  config.render_resolution = 12
  example = pipeline.MakeExample(config)((0, 0, _record(3)), np.random.default_rng(5))
  assert example["render_rgb"].shape == (3, 4, 4, 3)
  assert example["render_mask"].min() >= -1e-6 and example["render_mask"].max() <= 1 + 1e-6


def test_find_shards_accepts_every_level_of_the_tfds_layout(folder):
  shards = pipeline.find_shards(folder)
  assert len(shards) == 3 and all(".array_record-" in s for s in shards)
  name_dir = os.path.dirname(folder)
  data_dir = os.path.dirname(name_dir)
  assert pipeline.find_shards(name_dir) == shards
  assert pipeline.find_shards(data_dir) == shards
  assert pipeline.find_shards(os.path.join(folder, "*-00001-of-*")) == shards[1:2]


def test_orbit_clips_hold_evenly_spaced_views_in_order(folder):
  """VIEWS=6 orbit views, 3 frames: every other view, starting anywhere, wrapping."""
  config = _config((folder, 1.0), example="orbit", num_frames=3, frame_resolution=8,
                   batch_size=4)
  batch = next(iter(pipeline.make_dataset(config)))
  assert {k: v.shape for k, v in batch.items()} == {
      "frames": (4, 3, 8, 8, 3), "caption": (4, pipeline.CAPTION_BYTES), "azimuth": (4, 3),
      "elevation": (4,), "background": (4, 3), "dataset_index": (4,)}
  assert pipeline.decode_captions(batch["caption"]) == ["a test asset"] * 4
  starts = set()
  for b in range(4):
    # Opaque pixels carry the view index in blue; the frames step 2 views at a time.
    seen = [round(batch["frames"][b, f, 0, 0, 2] * 255 / 10) for f in range(3)]
    start = seen[0]
    assert seen == [(start + 2 * f) % VIEWS for f in range(3)]
    starts.add(start)
    # The 16x16 view box-averaged to 8x8: right-most 2 columns transparent -> white.
    expected = _pattern(seen[1]).astype(np.float32) / 255
    alpha = expected[..., 3:]
    composite = expected[..., :3] * alpha + (1 - alpha)
    composite = composite.reshape(8, 2, 8, 2, 3).mean(axis=(1, 3))
    np.testing.assert_allclose(batch["frames"][b, 1], composite, atol=1e-5)
    step = np.mod(np.diff(batch["azimuth"][b]), 2 * np.pi)
    np.testing.assert_allclose(step, 2 * (2 * np.pi / VIEWS), atol=1e-5)
  config.random_start = False
  batch = next(iter(pipeline.make_dataset(config)))
  assert all(round(batch["frames"][b, 0, 0, 0, 2] * 255 / 10) == 0 for b in range(4))


def test_orbit_clips_reject_frame_counts_that_do_not_divide_the_orbit(folder):
  config = _config((folder, 1.0), example="orbit", num_frames=4, frame_resolution=8, strict=True)
  with pytest.raises(records.BadRecordError, match="evenly spaced"):
    next(iter(pipeline.make_dataset(config)))
  with pytest.raises(ValueError, match="example must be one of"):
    pipeline.make_map_dataset(_config((folder, 1.0), example="clips"))


def test_captions_survive_the_byte_encoding():
  text = "a red torus — beside a cube"
  assert pipeline.decode_captions(pipeline.encode_caption(text)[None]) == [text]
  long = "é" * 200  # 400 bytes: cut at a character boundary
  assert pipeline.decode_captions(pipeline.encode_caption(long)[None]) == ["é" * 128]


def test_a_fraction_keeps_the_same_first_records_for_every_seed(tmp_path):
  def record(index):  # every view of record i is one opaque grey, 20 i
    grey = np.full((SIZE, SIZE, 4), (20 * index, 20 * index, 20 * index, 255), np.uint8)
    return _record(index, images=[grey] * VIEWS)

  folder = _dataset(tmp_path, "grey", [record(i) for i in range(10)])

  def records_seen(seed, fraction):
    config = _config((folder, 1.0), batch_size=1, num_epochs=1, seed=seed)
    config.datasets[0]["fraction"] = fraction
    return sorted(int(round(float(b["source_image"][0, 0, 0, 0]) * 255 / 20))
                  for b in pipeline.make_dataset(config))

  assert records_seen(0, 1.0) == list(range(10))
  assert records_seen(0, 0.5) == records_seen(7, 0.5) == [0, 1, 2, 3, 4]
  assert records_seen(3, 0.25) == [0, 1]  # round(2.5) = 2 records
