"""The compatible renderer against a PyTorch re-statement of the released one.

``torch_renderer`` repeats the released float32 arithmetic (slab test,
``linspace``, positions, in-box test, ``torch.sort``); both renderers get the
same float32 rays, seeded random decoder weights in the released layout and
random planes, so their frames must agree pixel for pixel.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vf3d_jax.rendering import cameras
from vf3d_jax.rendering import renderer

torch = pytest.importorskip("torch")
from tests import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.rendering import torch_renderer  # pylint: disable=g-import-not-at-top,wrong-import-position

RESOLUTION = 20
CHANNELS = 8
# The released sample counts.
OPTIONS = renderer.RenderOptions(num_coarse=64, num_fine=64, chunk_size=512)
render_rays = jax.jit(renderer.render_rays, static_argnames="options")


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture(scope="module")
def scene():
  """A 24->64->64->64->4 decoder, planes [3, 8, 16, 16] and three views.

  Two views on a radius-2 orbit at elevation 0.2 (their top rows leave the box
  through z = +1) and one at the turntable's radius 1.5, elevation 0.
  """
  decoder = torch_reference.Decoder(3 * CHANNELS, 64, 4).eval()
  torch_reference.randomize_(decoder, seed=0, scale=1.5)
  planes = torch.randn(3, CHANNELS, 16, 16, generator=torch.Generator().manual_seed(1))
  linears = [m for m in decoder.net if isinstance(m, torch.nn.Linear)]
  params = {f"net_{2 * i}": {"kernel": jnp.asarray(m.weight.detach().numpy().T),
                             "bias": jnp.asarray(m.bias.detach().numpy())}
            for i, m in enumerate(linears)}
  c2w = np.concatenate([
      cameras.orbit_cameras(2, radius=2.0, elevation=0.2, azimuth_offset=0.1, xp=np),
      cameras.orbit_cameras(1, radius=1.5, elevation=0.0, azimuth_offset=0.7, xp=np)])
  intrinsics = np.tile(cameras.DEFAULT_INTRINSICS[None], (3, 1))
  origins, directions = jax.jit(
      jax.vmap(cameras.generate_rays, in_axes=(0, 0, None)), static_argnums=2)(
          c2w, intrinsics, RESOLUTION)
  return dict(decoder=decoder, planes_torch=planes,
              planes=jnp.asarray(planes.permute(0, 2, 3, 1).numpy()), params=params,
              origins=np.asarray(origins), directions=np.asarray(directions))


def _render_both(scene, noise, options=OPTIONS):
  """Each view rendered by both; ``(ours, released)`` dicts of [V, R*R, ...]."""
  ours, released = [], []
  for v in range(scene["origins"].shape[0]):
    view_noise = renderer.RenderNoise(noise.jitter[v], noise.uniforms[v])
    ours.append(render_rays(scene["params"], scene["planes"], scene["origins"][v],
                            scene["directions"][v], view_noise, options=options))
    rgb, depth, opacity = torch_renderer.render_view(
        scene["decoder"], scene["planes_torch"],
        torch.from_numpy(scene["origins"][v].copy()),
        torch.from_numpy(scene["directions"][v].copy()),
        torch.from_numpy(np.array(view_noise.jitter)),
        torch.from_numpy(np.array(view_noise.uniforms)))
    released.append(dict(rgb=rgb.numpy(), depth=depth.numpy(), opacity=opacity.numpy()))
  stack = lambda outs: {k: np.stack([np.asarray(o[k]) for o in outs]) for k in outs[0]}
  return stack(ours), stack(released)


def _psnr(a, b):
  return 10 * np.log10(1 / np.mean((a - b) ** 2))


@pytest.mark.parametrize("random", [False, True])
def test_frames_match_released(scene, random):
  """float32 against float32: observed differences are below 1e-6."""
  num_views = scene["origins"].shape[0]
  if random:
    noise = renderer.view_noise(jax.random.key(0), num_views, RESOLUTION, None, OPTIONS)
  else:
    noise = renderer.deterministic_noise((num_views, RESOLUTION ** 2), OPTIONS)
  ours, released = _render_both(scene, noise)
  assert released["opacity"].max() > 0.5
  np.testing.assert_allclose(ours["rgb"], released["rgb"], rtol=0, atol=3e-6)
  np.testing.assert_allclose(ours["opacity"], released["opacity"], rtol=0, atol=3e-6)
  np.testing.assert_allclose(ours["depth"], released["depth"], rtol=0, atol=1e-5)
  assert _psnr(ours["rgb"], released["rgb"]) > 120


def test_deterministic_frames_depend_on_the_surface_rule(scene):
  """The test above can fail: counting every sample on the box surface as
  inside (the clean mode's rule) visibly changes deterministic frames."""
  num_views = scene["origins"].shape[0]
  noise = renderer.deterministic_noise((num_views, RESOLUTION ** 2), OPTIONS)
  clean = renderer.RenderOptions(num_coarse=64, num_fine=64, chunk_size=512, mode="clean")
  ours, released = _render_both(scene, noise, clean)
  difference = np.abs(ours["opacity"] - released["opacity"])
  assert np.sum(difference > 1e-3) >= 10
  assert _psnr(ours["rgb"], released["rgb"]) < 80
