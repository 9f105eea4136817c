"""Data-engine features: Hugging Face DINOv2 folders, LRM encoders, the extractor registry."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lrm as lrm_configs
from vf3d_jax.engine import features
from vf3d_jax.models import dinov2, lrm
from vf3d_jax.weights import vfusion3d
from vf3d_jax.weights.state_dict import read_state_dict, write_safetensors

# The tiny transformers Dinov2Model of these tests: 32 wide, 2 layers, 2 heads,
# MLP 64, 8 px patches, trained at 32 px (a 4 x 4 position grid).
WIDTH, DEPTH, HEADS, MLP, PATCH, GRID = 32, 2, 2, 64, 8, 4
# Float32 PyTorch against float32 XLA with highest-precision matmuls: measured
# differences are at most 5e-7 on features of magnitude up to ~2.3.
ATOL, RTOL = 1e-5, 1e-5


@pytest.fixture(scope="module")
def hf_dinov2(tmp_path_factory):
  """``(folder, model)``: a random Dinov2Model and the folder save_pretrained wrote."""
  pytest.importorskip("torch")
  from tests import torch_reference

  ref = torch_reference.DinoWrapper(WIDTH, DEPTH, HEADS, MLP, PATCH, GRID, legacy=False).eval()
  torch_reference.randomize_(ref, seed=5)
  folder = tmp_path_factory.mktemp("dinov2") / "tiny-dinov2"
  ref.model.save_pretrained(folder, safe_serialization=True)
  return folder, ref


def _torch_features(ref, images):
  """CLS and mean patch token of transformers' last_hidden_state (ImageNet-normalised pixels)."""
  import torch
  with torch.no_grad():
    tokens = ref(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  return np.concatenate([tokens[:, 0], tokens[:, 1:].mean(axis=1)], axis=-1)


def _frames(n, size, seed=0):
  return np.random.default_rng(seed).uniform(size=(n, size, size, 3)).astype(np.float32)


def test_load_dinov2_reads_the_architecture(hf_dinov2):
  folder, _ = hf_dinov2
  assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
  arch, params = features.load_dinov2(folder)
  assert arch == dinov2.EncoderArch(width=WIDTH, depth=DEPTH, heads=HEADS, mlp_dim=MLP,
                                    patch_size=PATCH, pos_grid=GRID, pos_resize="current", eps=1e-6)
  assert params["embeddings"]["position_embeddings"].shape == (1, 1 + GRID * GRID, WIDTH)
  assert params["layer_1"]["fc1"]["kernel"].shape == (WIDTH, MLP)


@pytest.mark.parametrize("size", [PATCH * GRID, 48])
def test_dinov2_features_match_transformers(hf_dinov2, size):
  # 32 px: the position table as trained; 48 px: resized 4x4 -> 6x6 by the
  # "current" mode, which is transformers' own interpolate_pos_encoding (see
  # tests/models/test_dinov2.py). Frames of the input size are not resampled.
  folder, ref = hf_dinov2
  extractor = features.make_extractor(f"dinov2:{folder}", input_size=size, batch_size=4)
  assert (extractor.name, extractor.dim, extractor.input_size) == (f"dinov2:{folder}", 2 * WIDTH,
                                                                   size)
  images = _frames(3, size)
  ours = extractor(images)
  expected = _torch_features(ref, images)
  assert ours.shape == expected.shape == (3, 2 * WIDTH) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, expected, rtol=RTOL, atol=ATOL)


def test_resized_frames_match_an_antialiased_torch_resize(hf_dinov2):
  # The preprocessing's resize (jax.image.resize, bicubic, antialiased) is
  # PIL-style; PyTorch's bicubic with antialias=True is the same filter.
  import torch
  folder, ref = hf_dinov2
  extractor = features.make_extractor(f"dinov2:{folder}", input_size=PATCH * GRID)
  images = _frames(2, 56, seed=1)
  resized = torch.nn.functional.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2),
                                            size=(32, 32), mode="bicubic", antialias=True,
                                            align_corners=False).clamp(0, 1)
  expected = _torch_features(ref, resized.permute(0, 2, 3, 1).numpy())
  np.testing.assert_allclose(extractor(images), expected, rtol=RTOL, atol=ATOL)  # 4e-7 measured


@pytest.fixture(scope="module")
def tiny_lrm(tmp_path_factory):
  arch = lrm.LRMArch.from_dict(lrm_configs.get_config("tiny").model.to_dict())
  params = features.random_params(lrm.param_shapes(arch), seed=1)
  path = tmp_path_factory.mktemp("lrm") / "model.safetensors"
  vfusion3d.save_checkpoint_file(path, arch, params)
  return path, arch, params


def test_lrm_extractor_is_the_checkpoints_encoder(tiny_lrm):
  path, arch, params = tiny_lrm
  extractor = features.make_extractor(f"lrm:{path}", input_size=arch.input_size, batch_size=2)
  assert extractor.arch == arch.encoder and extractor.dim == 2 * arch.encoder.width
  images = _frames(3, arch.input_size, seed=2)
  encoder = dinov2.Dinov2Encoder(arch.encoder)
  tokens = jax.jit(encoder.apply)({"params": params["encoder"]}, jnp.asarray(images))
  expected = np.concatenate([tokens[:, 0], tokens[:, 1:].mean(axis=1)], axis=-1)
  np.testing.assert_allclose(extractor(images), expected, rtol=1e-6, atol=1e-6)


def test_batches_and_videos():
  extractor = features.make_extractor("random:0", input_size=32, batch_size=32)
  small = features.make_extractor("random:0", input_size=32, batch_size=3)
  frames = _frames(7, 24, seed=3)  # resized to 32
  one = extractor(frames)
  assert one.shape == (7, features.RANDOM_ARCH.width * 2) and np.isfinite(one).all()
  np.testing.assert_allclose(small(frames), one, rtol=1e-6, atol=1e-6)
  assert float(np.abs(one[0] - one[1]).max()) > 1e-3  # frames differ, so do features
  np.testing.assert_allclose(extractor((frames * 255).round().astype(np.uint8)),
                             extractor((frames * 255).round() / 255), rtol=1e-6, atol=1e-6)
  assert extractor(frames[:0]).shape == (0, extractor.dim)
  other_seed = features.make_extractor("random:1", input_size=32)(frames)
  assert float(np.abs(other_seed - one).max()) > 1e-3

  videos = frames[:6].reshape(2, 3, 24, 24, 3)
  per_frame = features.video_features(small, videos)
  assert per_frame.shape == (2, 3, extractor.dim)
  np.testing.assert_allclose(per_frame.reshape(6, -1), one[:6], rtol=1e-6, atol=1e-6)
  pooled = features.pool_frames(per_frame)
  np.testing.assert_array_equal(pooled.first, per_frame[:, 0])
  np.testing.assert_allclose(pooled.mean, per_frame.mean(axis=1), rtol=1e-6)
  with pytest.raises(ValueError, match=r"\[B, F, H, W, 3\]"):
    features.video_features(small, frames)


def _one_line(excinfo):
  message = str(excinfo.value)
  assert "\n" not in message, message
  return message


def test_missing_folder_and_files(tmp_path, hf_dinov2):
  missing = tmp_path / "dinov2-base"
  for call in (lambda: features.load_dinov2(missing),
               lambda: features.make_extractor(f"dinov2:{missing}")):
    with pytest.raises(FileNotFoundError) as excinfo:
      call()
    message = _one_line(excinfo)
    assert str(missing) in message and "no such folder" in message
    assert "huggingface-cli download facebook/dinov2-base" in message
    assert f"--local-dir {missing}" in message
  folder, _ = hf_dinov2
  partial = tmp_path / "partial"
  partial.mkdir()
  shutil.copy(folder / "config.json", partial)
  with pytest.raises(FileNotFoundError, match="no model.safetensors") as excinfo:
    features.load_dinov2(partial)
  _one_line(excinfo)


def test_mismatched_weights_are_named(tmp_path, hf_dinov2):
  folder, _ = hf_dinov2
  bad = tmp_path / "bad"
  shutil.copytree(folder, bad)
  state = read_state_dict(folder / "model.safetensors")
  del state["encoder.layer.1.mlp.fc2.bias"]
  state["pooler.dense.weight"] = np.zeros((2, 2), np.float32)
  write_safetensors(state, bad / "model.safetensors")
  with pytest.raises(ValueError) as excinfo:
    features.load_dinov2(bad)
  message = _one_line(excinfo)
  assert "missing: encoder.layer.1.mlp.fc2.bias" in message
  assert "unexpected: pooler.dense.weight" in message

  config = json.loads((folder / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps(dict(config, image_size=48)))
  shutil.copy(folder / "model.safetensors", bad)
  with pytest.raises(ValueError, match=r"wrong shape: embeddings.position_embeddings "
                     r"\(1, 17, 32\) \(expected \(1, 37, 32\)\)") as excinfo:
    features.load_dinov2(bad)
  _one_line(excinfo)

  (bad / "config.json").write_text(json.dumps(dict(config, use_swiglu_ffn=True)))
  with pytest.raises(ValueError, match="unsupported DINOv2 variant") as excinfo:
    features.load_dinov2(bad)
  _one_line(excinfo)


def test_specs_and_registry(monkeypatch):
  with pytest.raises(ValueError) as excinfo:
    features.make_extractor("clip:/models/clip")
  message = _one_line(excinfo)
  assert "unknown feature extractor 'clip'" in message
  assert "registered: dinov2, lrm, random" in message
  for spec, pattern in (("random:x", "integer seed"), ("dinov2:", "needs the folder"),
                        ("lrm:", "needs the path")):
    with pytest.raises(ValueError, match=pattern):
      features.make_extractor(spec)
  with pytest.raises(ValueError, match="multiple of the patch size 8"):
    features.make_extractor("random:0", input_size=30)

  monkeypatch.setattr(features, "_FACTORIES", dict(features._FACTORIES))
  made = []

  def factory(argument, *, input_size, batch_size):
    made.append((argument, input_size, batch_size))
    return features.make_extractor("random:0", input_size=input_size, batch_size=batch_size)

  features.register_extractor("mine", factory)
  extractor = features.make_extractor("mine:a:b", input_size=16, batch_size=5)
  assert made == [("a:b", 16, 5)] and extractor.input_size == 16
  assert "mine" in features.registered_extractors()
  with pytest.raises(ValueError, match="already registered"):
    features.register_extractor("mine", factory)
  with pytest.raises(ValueError, match="without ':'"):
    features.register_extractor("a:b", factory)
