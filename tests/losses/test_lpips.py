"""LPIPS against a PyTorch reference built like the ``lpips`` package."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from vf3d_jax.losses import lpips as lpips_lib

# Conv weights/biases of torchvision's VGG16 features plus the five heads.
VGG16_LPIPS_PARAMETER_COUNT = 14_714_688 + 64 + 128 + 256 + 512 + 512


def _torch_vgg16_features() -> nn.Sequential:
  """torchvision's ``vgg16().features``: the same layer indices, no torchvision."""
  layers, in_channels = [], 3
  for item in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
               512, 512, 512, "M", 512, 512, 512, "M"):
    if item == "M":
      layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    else:
      layers += [nn.Conv2d(in_channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
      in_channels = item
  return nn.Sequential(*layers)


class _TorchLinHead(nn.Module):

  def __init__(self, channels):
    super().__init__()
    self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class _TorchLPIPS(nn.Module):
  """lpips.LPIPS(net='vgg', version='0.1', lpips=True, spatial=False) in eval mode."""

  def __init__(self):
    super().__init__()
    self.features = _torch_vgg16_features()
    for k, channels in enumerate((64, 128, 256, 512, 512)):
      setattr(self, f"lin{k}", _TorchLinHead(channels))
    self.register_buffer("shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None])
    self.register_buffer("scale", torch.tensor([.458, .448, .450])[None, :, None, None])

  def taps(self, x):
    outs, start = [], 0
    for end in (4, 9, 16, 23, 30):  # the reference's slice1..slice5
      for i in range(start, end):
        x = self.features[i](x)
      outs.append(x)
      start = end
    return outs

  def forward(self, in0, in1, normalize=False):
    if normalize:
      in0, in1 = 2 * in0 - 1, 2 * in1 - 1
    outs0 = self.taps((in0 - self.shift) / self.scale)
    outs1 = self.taps((in1 - self.shift) / self.scale)
    val = 0
    for k, (f0, f1) in enumerate(zip(outs0, outs1)):
      f0 = f0 / (torch.sqrt(torch.sum(f0 ** 2, dim=1, keepdim=True)) + 1e-10)
      f1 = f1 / (torch.sqrt(torch.sum(f1 ** 2, dim=1, keepdim=True)) + 1e-10)
      val = val + getattr(self, f"lin{k}").model((f0 - f1) ** 2).mean([2, 3], keepdim=True)
    return val


def _random_torch_weights(seed=0):
  """State dicts in the layouts of vgg16-397923af.pth and lpips' vgg.pth."""
  gen = torch.Generator().manual_seed(seed)
  vgg = {}
  for index, layer in enumerate(_torch_vgg16_features()):
    if isinstance(layer, nn.Conv2d):
      fan_in = layer.in_channels * 9
      vgg[f"features.{index}.weight"] = torch.randn(
          layer.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5
      vgg[f"features.{index}.bias"] = torch.randn(layer.bias.shape, generator=gen) * 0.05
  # The real file carries the classifier too (much larger); it must be ignored.
  vgg["classifier.0.weight"] = torch.zeros(4, 8)
  vgg["classifier.0.bias"] = torch.zeros(4)
  lin = {f"lin{k}.model.1.weight": torch.rand((1, c, 1, 1), generator=gen) * 0.1
         for k, c in enumerate((64, 128, 256, 512, 512))}
  return vgg, lin


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory):
  vgg, lin = _random_torch_weights()
  root = tmp_path_factory.mktemp("lpips_weights")
  torch.save(vgg, root / "vgg16-397923af.pth")
  torch.save(lin, root / "vgg.pth")
  return root / "vgg16-397923af.pth", root / "vgg.pth", vgg, lin


@pytest.fixture(scope="module")
def params(torch_files):
  vgg_path, lin_path, _, _ = torch_files
  return lpips_lib.load_lpips_params_from_torch(vgg_path, lin_path)


def _torch_reference(vgg, lin):
  model = _TorchLPIPS().eval()
  missing, unexpected = model.load_state_dict(
      {**{k: v for k, v in vgg.items() if k.startswith("features.")}, **lin}, strict=False)
  assert set(missing) == {"shift", "scale"} and not unexpected
  return model


def test_matches_torch_reference(torch_files, params):
  # fp32 on both sides (CPU torch has no TF32), XLA at full matmul precision:
  # only summation order differs, so the distances agree to ~1e-6 relative.
  _, _, vgg, lin = torch_files
  rng = np.random.default_rng(0)
  images0 = rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
  # The second pair is a perturbed copy, so distances of two scales are checked.
  images1 = np.concatenate([rng.uniform(-1, 1, (1, 64, 64, 3)),
                            images0[1:] + 0.1 * rng.normal(size=(1, 64, 64, 3))]).astype(np.float32)
  with torch.no_grad():
    expected = _torch_reference(vgg, lin)(
        torch.from_numpy(images0).permute(0, 3, 1, 2),
        torch.from_numpy(images1).permute(0, 3, 1, 2)).numpy().reshape(-1)

  @jax.jit
  def both(params, a, b):
    # [-1, 1] inputs, and the same images in [0, 1] with normalize=True.
    return (lpips_lib.lpips_distance(params, a, b),
            lpips_lib.lpips_distance(params, (a + 1) / 2, (b + 1) / 2, normalize=True))

  with jax.default_matmul_precision("highest"):
    got, got_normalized = both(params, images0, images1)
  assert got.shape == (2,) and got.dtype == jnp.float32
  assert expected[1] < 0.5 * expected[0]
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  np.testing.assert_allclose(got_normalized, expected, rtol=1e-5)


def test_identical_images_and_batch_shape(params):
  rng = np.random.default_rng(1)
  images = rng.uniform(-1, 1, (2, 1, 16, 16, 3)).astype(np.float32)
  other = rng.uniform(-1, 1, (2, 1, 16, 16, 3)).astype(np.float32)
  distance = jax.jit(lpips_lib.lpips_distance)
  same = distance(params, images, images)
  assert same.shape == (2, 1)
  np.testing.assert_allclose(same, 0.0, atol=1e-10)
  batched = distance(params, images, other)
  single = distance(params, images[1], other[1])
  np.testing.assert_allclose(batched[1], single, rtol=1e-5)


def test_bfloat16_compute_is_close(params):
  rng = np.random.default_rng(2)
  images0 = rng.uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
  images1 = np.clip(images0 + 0.2 * rng.normal(size=images0.shape), 0, 1).astype(np.float32)
  full = lpips_lib.lpips_distance(params, images0, images1, normalize=True)
  half = jax.jit(lambda p, a, b: lpips_lib.lpips_distance(
      p, a, b, normalize=True, dtype=jnp.bfloat16))(params, images0, images1)
  assert half.dtype == jnp.float32
  # bf16 keeps 8 mantissa bits: a few percent through 13 conv layers.
  np.testing.assert_allclose(half, full, rtol=5e-2)


def test_parameter_count_and_layout(params):
  count = sum(x.size for x in jax.tree_util.tree_leaves(params))
  assert count == VGG16_LPIPS_PARAMETER_COUNT
  assert params["net"]["features_0"]["kernel"].shape == (3, 3, 3, 64)
  assert params["net"]["features_28"]["kernel"].shape == (3, 3, 512, 512)
  assert params["lin4"]["kernel"].shape == (1, 1, 512, 1)
  images = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  init = jax.eval_shape(lpips_lib.LPIPS().init, jax.random.key(0), images, images)
  assert jax.tree_util.tree_structure(init["params"]) == jax.tree_util.tree_structure(params)


def test_npz_round_trip(tmp_path, torch_files, params):
  _, _, vgg, _ = torch_files
  path = tmp_path / "lpips_vgg.npz"
  lpips_lib.save_lpips_params(params, path)
  loaded = lpips_lib.load_lpips_params(path)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)
  # The conversion itself: [out, in, kh, kw] -> [kh, kw, in, out].
  np.testing.assert_array_equal(loaded["net"]["features_7"]["kernel"][1, 2, 5, 9],
                                vgg["features.7.weight"][9, 5, 1, 2].numpy())


def test_whole_lpips_state_dict_is_accepted(torch_files, params):
  _, _, vgg, lin = torch_files
  slices = {0: 1, 2: 1, 5: 2, 7: 2, 10: 3, 12: 3, 14: 3, 17: 4, 19: 4, 21: 4, 24: 5, 26: 5, 28: 5}
  state = {"scaling_layer.shift": np.zeros((1, 3, 1, 1)), **lin}
  for key, value in vgg.items():
    if key.startswith("features."):
      index = int(key.split(".")[1])
      state[key.replace("features.", f"net.slice{slices[index]}.")] = value.numpy()
  converted = lpips_lib.convert_torch_state_dicts(state)
  jax.tree_util.tree_map(np.testing.assert_array_equal, converted, params)


def test_conversion_errors_are_one_line(torch_files):
  _, _, vgg, lin = torch_files
  vgg = {k: v.numpy() for k, v in vgg.items()}
  lin = {k: v.numpy() for k, v in lin.items()}

  def error(*state_dicts):
    with pytest.raises(ValueError) as info:
      lpips_lib.convert_torch_state_dicts(*state_dicts)
    message = str(info.value)
    assert "\n" not in message
    return message

  assert "missing 5 keys: lin0.model.1.weight" in error(vgg)
  broken = dict(vgg, **{"features.3.weight": np.zeros(3)})
  del broken["features.26.bias"]
  message = error(broken, lin)
  assert "missing 1 keys: features.26.bias" in message
  assert "unexpected 1 keys: features.3.weight" in message
  message = error(dict(vgg, **{"features.5.weight": np.zeros((128, 32, 3, 3))}), lin)
  assert "features.5.weight (128, 32, 3, 3) (expected (128, 64, 3, 3))" in message


def test_npz_errors_are_one_line(tmp_path, params):
  flat = {"net/features_0/kernel": np.zeros((3, 3, 3, 64)), "extra": np.zeros(2)}
  np.savez(tmp_path / "bad.npz", **flat)
  with pytest.raises(ValueError) as info:
    lpips_lib.load_lpips_params(tmp_path / "bad.npz")
  message = str(info.value)
  assert "\n" not in message and "missing 30 keys" in message
  assert "unexpected 1 keys: extra" in message


def test_gradients_are_finite_where_features_vanish(params):
  # relu1_2 all zero (very negative biases): the channel norm is 0 everywhere,
  # where a plain sqrt would turn the gradient into NaN.
  dead = jax.tree_util.tree_map(lambda x: x, params)
  dead["net"]["features_2"]["bias"] = jnp.full((64,), -1e4)
  rng = np.random.default_rng(3)
  pred = rng.uniform(0, 1, (1, 16, 16, 3)).astype(np.float32)
  target = rng.uniform(0, 1, (1, 16, 16, 3)).astype(np.float32)
  loss = lambda p, x: lpips_lib.lpips_distance(p, x, target, normalize=True).sum()
  grad_live = jax.jit(jax.grad(loss, argnums=1))(params, pred)
  grad_dead = jax.jit(jax.grad(loss, argnums=1))(dead, pred)
  assert np.all(np.isfinite(grad_live)) and np.abs(grad_live).max() > 0
  assert np.all(np.isfinite(grad_dead))


def test_convert_lpips_tool(tmp_path, torch_files, params):
  vgg_path, lin_path, _, _ = torch_files
  output = tmp_path / "lpips_vgg.npz"
  result = subprocess.run(
      [sys.executable, "-m", "tools.convert_lpips", "--vgg", str(vgg_path), "--lin", str(lin_path),
       "--output", str(output)],
      cwd=pathlib.Path(__file__).resolve().parents[2], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert "14,716,160 LPIPS parameters" in result.stdout
  jax.tree_util.tree_map(np.testing.assert_array_equal, lpips_lib.load_lpips_params(output), params)
