"""Checkpoints in the released layout: round trips, architecture inference, errors."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vf3d_jax import pretrained
from vf3d_jax.engine import features
from vf3d_jax.models import lrm
from vf3d_jax.models.dinov2 import EncoderArch
from vf3d_jax.weights import vfusion3d
from vf3d_jax.weights.state_dict import (CheckpointError, read_safetensors_metadata,
                                         read_state_dict, write_safetensors)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Released depths (12 encoder layers, 16 blocks, 4 decoder layers) so all 592
# key names occur; small widths keep the file tiny. Head dims are 64-free, so
# the heads are what inference must guess: width // 64 -> set widths to 64k.
FULL_DEPTH = lrm.LRMArch(
    encoder=EncoderArch(width=64, depth=12, heads=1, mlp_dim=32, patch_size=14, pos_grid=37),
    camera_embed_dim=24, width=128, layers=16, heads=2, mlp_dim=32, triplane_res=32,
    triplane_channels=8, decoder_hidden=16)


def _random_params(arch: lrm.LRMArch, seed: int):
  """Random values in the architecture's shapes, drawn with NumPy (an eager ``init`` compiles
  each of its hundreds of initialisers separately: half a minute on CPU)."""
  return features.random_params(lrm.param_shapes(arch), seed)


@pytest.fixture(scope="module")
def released_style(tmp_path_factory):
  """A state dict in the released layout, with random values, and its safetensors file."""
  params = _random_params(FULL_DEPTH, 0)
  state = vfusion3d.to_state_dict(params)
  path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
  write_safetensors(state, path)  # no metadata: like the released file
  return params, state, path


def _same(a, b):
  return jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b))


def test_state_dict_has_every_released_key(released_style):
  _, state, _ = released_style
  assert len(state) == 592
  assert "encoder.model.embeddings.mask_token" in state
  assert state["transformer.deconv.weight"].shape == (128, 8, 2, 2)
  assert state["transformer.layers.15.self_attn.in_proj_weight"].shape == (384, 128)


def test_safetensors_round_trip_infers_architecture(released_style):
  params, _, path = released_style
  arch, loaded = pretrained.load_lrm(path)
  assert arch == FULL_DEPTH
  assert _same(params, loaded)


def test_torch_pickle_round_trip(released_style, tmp_path):
  torch = pytest.importorskip("torch")
  params, state, _ = released_style
  path = tmp_path / "model.pth"
  torch.save({"model_state_dict": {k: torch.from_numpy(v) for k, v in state.items()},
              "epoch": 3}, path)
  arch, loaded = pretrained.load_lrm(path)
  assert arch == FULL_DEPTH
  assert _same(params, loaded)


def test_released_shapes_give_released_architecture():
  lines = _released_shapes()
  state = {k: np.broadcast_to(np.float32(0), shape) for k, shape in lines.items()}
  assert vfusion3d.infer_arch(state) == lrm.LRMArch()


def test_released_key_table_converts_to_the_released_architecture():
  """All 592 released keys and shapes map onto our parameter tree, none missing or left over."""
  state = {k: np.broadcast_to(np.float32(0), shape) for k, shape in _released_shapes().items()}
  assert len(state) == 592
  params = vfusion3d.from_state_dict(state, lrm.LRMArch())
  expected = jax.tree.map(lambda s: s.shape, lrm.param_shapes(lrm.LRMArch()))
  assert jax.tree.map(np.shape, params) == expected
  assert lrm.count_params(params) == 452_135_700


def _released_shapes():
  """The released checkpoint's key table (``tests/weights/vfusion3d_state_dict.tsv``)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vfusion3d_state_dict.tsv")
  out = {}
  for line in open(path).read().strip().splitlines():
    key, shape = line.split("\t")
    out[key] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
  return out


def test_metadata_keeps_head_counts(tmp_path):
  arch = lrm.LRMArch(encoder=EncoderArch(width=32, depth=1, heads=4, mlp_dim=16, patch_size=8,
                                         pos_grid=4), camera_embed_dim=16, width=32, layers=1,
                     heads=8, mlp_dim=16, triplane_res=2, triplane_channels=4, decoder_hidden=8,
                     input_size=32)
  params = _random_params(arch, 1)
  vfusion3d.save_checkpoint_file(tmp_path / "m.safetensors", arch, params)
  loaded_arch, loaded = pretrained.load_lrm(tmp_path / "m.safetensors")
  assert loaded_arch == arch
  assert _same(params, loaded)


def test_missing_unexpected_and_wrong_shape_are_named(released_style):
  _, state, _ = released_style
  broken = dict(state)
  del broken["transformer.layers.3.norm2.mlp.1.bias"]
  broken["transformer.extra.weight"] = np.zeros(3, np.float32)
  broken["synthesizer.decoder.net.2.weight"] = np.zeros((16, 15), np.float32)
  with pytest.raises(CheckpointError) as e:
    vfusion3d.from_state_dict(broken, FULL_DEPTH)
  msg = str(e.value)
  assert "\n" not in msg
  assert "missing: transformer.layers.3.norm2.mlp.1.bias" in msg
  assert "unexpected: transformer.extra.weight" in msg
  assert "wrong shape: synthesizer.decoder.net.2.weight (16, 15) (expected (16, 16))" in msg


def test_not_a_checkpoint(tmp_path):
  png = tmp_path / "image.png"
  png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
  with pytest.raises(CheckpointError, match="not a safetensors file or a PyTorch checkpoint"):
    read_state_dict(png)
  with pytest.raises(CheckpointError, match="no such file"):
    read_state_dict(tmp_path / "absent.safetensors")
  other = tmp_path / "other.safetensors"
  write_safetensors({"conv.weight": np.zeros((2, 2), np.float32)}, other)
  with pytest.raises(CheckpointError, match="missing key encoder.model.embeddings.cls_token"):
    pretrained.load_lrm(other)


def test_truncated_files(released_style, tmp_path):
  _, _, path = released_style
  data = open(path, "rb").read()
  for cut in (len(data) // 2, 20, 5):
    short = tmp_path / f"short{cut}.safetensors"
    short.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="truncated|not a safetensors"):
      pretrained.load_lrm(short)


def test_truncated_torch_pickle(released_style, tmp_path):
  torch = pytest.importorskip("torch")
  _, state, _ = released_style
  path = tmp_path / "model.pth"
  torch.save({"model_state_dict": {k: torch.from_numpy(v) for k, v in list(state.items())[:5]}}, path)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match="cannot read PyTorch checkpoint"):
    pretrained.load_lrm(path)


def test_convert_tool_writes_loadable_orbax_dir(released_style, tmp_path):
  params, _, path = released_style
  out = tmp_path / "converted"
  run = lambda: subprocess.run(
      [sys.executable, "-m", "tools.convert_vfusion3d", "--input", str(path), "--output", str(out)],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  result = run()
  assert result.returncode == 0, result.stderr
  assert "parameters" in result.stdout
  arch, loaded = pretrained.load_lrm(out)
  assert arch == FULL_DEPTH
  assert _same(params, loaded)
  again = run()  # refuses to overwrite, in one line
  assert again.returncode == 1
  assert again.stderr.strip().startswith("error:") and "already exists" in again.stderr
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_convert_tool_reports_bad_input_in_one_line(tmp_path):
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"garbage")
  result = subprocess.run(
      [sys.executable, "-m", "tools.convert_vfusion3d", "--input", str(bad), "--output",
       str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().count("\n") == 0
  assert "not a safetensors file" in result.stderr
  assert not (tmp_path / "out").exists()


def _raw_safetensors(path, header: bytes, data: bytes = b"\0" * 4):
  path.write_bytes(len(header).to_bytes(8, "little") + header + data)
  return path


SMALL = lrm.LRMArch(encoder=EncoderArch(width=32, depth=1, heads=4, mlp_dim=16, patch_size=8,
                                        pos_grid=4), camera_embed_dim=16, width=32, layers=1,
                    heads=8, mlp_dim=16, triplane_res=2, triplane_channels=4, decoder_hidden=8,
                    input_size=32)


def _broken_checkpoints(root):
  """``(path, the whole error message)`` for each way a checkpoint's description can be wrong."""
  cases = []
  path = _raw_safetensors(root / "no_offsets.safetensors", b'{"w": {"dtype": "F32", "shape": [1]}}')
  cases.append((path, f"{path}: corrupt safetensors header (tensor 'w' has no data_offsets "
                      "[begin, end])"))
  params = _random_params(SMALL, 1)
  state = vfusion3d.to_state_dict(params)
  arch = SMALL.to_dict()
  path = root / "extra_metadata.safetensors"
  write_safetensors(state, path, metadata={vfusion3d.ARCH_METADATA_KEY: json.dumps(
      {**arch, "colour": "red", "encoder": {**arch["encoder"], "depthh": 2}})})
  cases.append((path, f"{path}: metadata 'vf3d_jax.arch': unknown architecture fields: colour, "
                      "encoder.depthh"))
  path = root / "bad_metadata.safetensors"
  write_safetensors(state, path, metadata={vfusion3d.ARCH_METADATA_KEY: "{not json"})
  cases.append((path, f"{path}: metadata 'vf3d_jax.arch': not valid JSON (Expecting property "
                      "name enclosed in double quotes: line 1 column 2 (char 1))"))
  for name, text, reason in (
      ("not_json", "{'width': 32}", "not valid JSON (Expecting property name enclosed in double "
       "quotes: line 1 column 2 (char 1))"),
      ("unknown", json.dumps({**arch, "widht": 32}), "unknown architecture fields: widht"),
      ("bad_value", json.dumps({**arch, "heads": 5}),
       "bad architecture (transformer width 32 is not divisible by 5 heads)")):
    directory = root / name
    pretrained.save_pretrained(directory, SMALL, params)
    (directory / pretrained.ARCH_FILE).write_text(text)
    cases.append((directory, f"{directory / pretrained.ARCH_FILE}: {reason}"))
  return cases


@pytest.fixture(scope="module")
def broken_checkpoints(tmp_path_factory):
  return _broken_checkpoints(tmp_path_factory.mktemp("broken"))


@pytest.mark.parametrize("case", ["no_offsets", "extra_metadata", "bad_metadata", "not_json",
                                  "unknown", "bad_value"])
def test_broken_descriptions_are_named_in_one_line(broken_checkpoints, case):
  path, message = next((p, m) for p, m in broken_checkpoints if p.name.split(".")[0] == case)
  with pytest.raises(CheckpointError) as e:
    pretrained.load_lrm(path)
  assert str(e.value) == message


def test_metadata_that_is_not_strings(tmp_path):
  path = _raw_safetensors(tmp_path / "m.safetensors", json.dumps(
      {"__metadata__": {"a": 1}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
  ).encode())
  with pytest.raises(CheckpointError) as e:
    read_safetensors_metadata(path)
  assert str(e.value) == (f"{path}: corrupt safetensors header (__metadata__ is not a "
                          "string-to-string object)")
  with pytest.raises(CheckpointError, match="^" + str(path) + ": cannot read safetensors"):
    pretrained.load_lrm(path)  # the safetensors reader's own message, in one line


def test_infer_reports_broken_descriptions_in_one_line(broken_checkpoints, tmp_path):
  for path, message in broken_checkpoints[::2]:  # a header, a metadata and an arch.json case
    done = subprocess.run(
        [sys.executable, "-m", "vf3d_jax.infer", "--checkpoint", str(path), "--output",
         str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert (done.returncode, done.stderr) == (1, f"error: {message}\n")
    assert not (tmp_path / "out").exists()
