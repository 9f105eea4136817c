"""Tests of the triplane renderer against an independent NumPy renderer."""

import os

# Sharding tests need 4 CPU devices; this must happen before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vf3d_jax.models.triplane import TriplaneDecoder, decoder_layer_names
from vf3d_jax.rendering import cameras
from vf3d_jax.rendering import renderer
from vf3d_jax.rendering import volume


def _load_reference():
  # Loaded by path under a unique name: other test folders may have a module of
  # the same name.
  path = os.path.join(os.path.dirname(__file__), "numpy_reference.py")
  spec = importlib.util.spec_from_file_location("rendering_numpy_reference", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


ref = _load_reference()

RESOLUTION = 6
SMALL = dict(num_coarse=16, num_fine=16, chunk_size=32)
render_views = jax.jit(renderer.render_views,
                       static_argnames=("resolution", "crop", "options"))


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture(scope="module")
def scene():
  """Planes [3, 8, 8, 6], a 18->16->16->16->4 decoder and three cameras.

  View 0 sees the whole box but its corner rays miss it, view 1 looks past the
  box so most of its rays miss, view 2 misses the box entirely.
  """
  planes = 1.5 * jax.random.normal(jax.random.key(0), (3, 8, 8, 6), jnp.float32)
  params = TriplaneDecoder(hidden=16).init(
      jax.random.key(1), jnp.zeros((1, 18)))["params"]
  # A denser, more varied field than the initialisation gives: opacities up to
  # ~0.9 and peaked weights, so that importance sampling matters.
  last = dict(params["net_6"])
  last["kernel"] = last["kernel"].at[:, 0].multiply(6.0)
  last["bias"] = last["bias"].at[0].add(1.0)
  params = dict(params, net_6=last)
  eyes = np.array([[2.0, 1.2, 1.0], [2.2, 1.6, 0.4], [3.0, 0.0, 0.0]], np.float32)
  targets = np.array([[0.0, 0.0, 0.0], [0.3, 1.4, 0.0], [3.0, 1.0, 0.0]], np.float32)
  c2w = cameras.look_at(eyes, targets, xp=np)
  intrinsics = np.tile(np.array([[0.8, 0.8, 0.5, 0.5]], np.float32), (3, 1))
  layers = [(np.asarray(params[n]["kernel"]), np.asarray(params[n]["bias"]))
            for n in decoder_layer_names(params)]
  return dict(planes=planes, params=params, c2w=c2w, intrinsics=intrinsics,
              layers=layers)


def _reference_views(scene, noise, options, resolution=RESOLUTION, crop=None):
  """Renders each view with the NumPy reference; arrays [V, S*S, ...]."""
  outs = []
  for v in range(scene["c2w"].shape[0]):
    origins, directions = ref.rays_for_view(scene["c2w"][v], scene["intrinsics"][v],
                                            resolution, crop)
    outs.append(ref.render_view(
        scene["layers"], np.asarray(scene["planes"]), origins, directions,
        np.asarray(noise.jitter[v]), np.asarray(noise.uniforms[v]),
        mode=options.mode, box_size=options.box_size, background=options.background))
  return [np.stack(x) for x in zip(*outs)]


def _compare_with_reference(scene, options, noise, resolution=RESOLUTION):
  out = render_views(scene["params"], scene["planes"], scene["c2w"],
                     scene["intrinsics"], resolution, noise=noise, options=options)
  rgb, depth, opacity = _reference_views(scene, noise, options, resolution)
  num_views = scene["c2w"].shape[0]
  # float32 against float64: observed errors are below 1e-6.
  np.testing.assert_allclose(out["rgb"].reshape(num_views, -1, 3), rgb, atol=3e-6)
  np.testing.assert_allclose(out["opacity"].reshape(num_views, -1), opacity, atol=3e-6)
  np.testing.assert_allclose(out["depth"].reshape(num_views, -1), depth, atol=1e-5)
  return out, (rgb, depth, opacity)


def test_scene_has_missed_rays(scene):
  """The cameras exercise the miss-ray rules (else the tests below are weak)."""
  for v, (low, high) in enumerate([(5, 20), (15, 30), (36, 36)]):
    origins, directions = ref.rays_for_view(scene["c2w"][v], scene["intrinsics"][v],
                                            RESOLUTION)
    t_min, t_max = ref.ray_limits(origins, directions, 2.0)
    assert low <= np.sum(t_max <= t_min) <= high, v


def test_intersect_box_matches_reference():
  rng = np.random.default_rng(0)
  origins = rng.uniform(-3, 3, (500, 3)).astype(np.float32)
  directions = rng.normal(size=(500, 3)).astype(np.float32)
  t_near, t_far, hit = volume.intersect_box(origins, directions, 2.0)
  t_min, t_max = ref.ray_limits(origins.astype(np.float64),
                                directions.astype(np.float64), 2.0)
  ref_hit = t_max > t_min
  assert 50 < ref_hit.sum() < 450
  np.testing.assert_array_equal(hit, ref_hit)
  np.testing.assert_allclose(t_near[ref_hit], t_min[ref_hit], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(t_far[ref_hit], t_max[ref_hit], rtol=1e-5, atol=1e-5)


def test_depth_inside_test_equals_position_test():
  """The in-box test on depths is the spec's inclusive test on positions."""
  rng = np.random.default_rng(1)
  origins = rng.uniform(-1.5, 1.5, (200, 3)).astype(np.float32)
  directions = rng.normal(size=(200, 3)).astype(np.float32)
  depths = rng.uniform(-3, 3, (200, 40)).astype(np.float32)
  t_near, t_far, hit = volume.intersect_box(origins, directions, 2.0)
  inside = volume.inside_box(jnp.asarray(depths), t_near, t_far, hit)
  points = (origins[:, None].astype(np.float64)
            + depths[..., None].astype(np.float64) * directions[:, None])
  expected = np.all(np.abs(points) <= 1.0, axis=-1)
  assert 500 < expected.sum() < 7500
  np.testing.assert_array_equal(inside, expected)


@pytest.mark.parametrize("mode", ["compatible", "clean"])
@pytest.mark.parametrize("random", [False, True])
def test_matches_reference(scene, mode, random):
  options = renderer.RenderOptions(mode=mode, **SMALL)
  num_views = scene["c2w"].shape[0]
  if random:
    noise = renderer.view_noise(jax.random.key(7), num_views, RESOLUTION, None, options)
  else:
    noise = renderer.deterministic_noise((num_views, RESOLUTION ** 2), options)
  out, (_, depth, opacity) = _compare_with_reference(scene, options, noise)
  assert opacity[0].max() > 0.8 and opacity[2].max() == 0
  if mode == "compatible":
    # Empty rays read the farthest sample of their view; the all-miss view
    # samples [-1, -2] (jitter pushes samples further back).
    np.testing.assert_array_equal(out["depth"][2], np.asarray(out["depth"])[2, 0, 0])
    assert -1 - 1 / 15 <= out["depth"][2, 0, 0] <= -1.0
    if not random:
      np.testing.assert_array_equal(out["depth"][2], -1.0)
  else:
    np.testing.assert_array_equal(out["depth"][2], 0.0)
    assert np.all(depth[:2][opacity[:2] > 0] > 0)


@pytest.mark.parametrize("mode", ["compatible", "clean"])
def test_camera_inside_box_matches_reference(scene, mode):
  """Rays from inside the box: the compatible mode also samples behind them."""
  options = renderer.RenderOptions(mode=mode, **SMALL)
  rng = np.random.default_rng(3)
  origins = np.tile(np.array([[0.3, -0.2, 0.1]], np.float32), (20, 1))
  directions = rng.normal(size=(20, 3)).astype(np.float32)
  directions /= np.linalg.norm(directions, axis=-1, keepdims=True)
  noise = renderer.draw_noise(jax.random.key(1), np.zeros(20, np.int32),
                              np.arange(20), options)
  out = jax.jit(renderer.render_rays, static_argnames="options")(
      scene["params"], scene["planes"], origins, directions, noise, options=options)
  rgb, depth, opacity = ref.render_view(
      scene["layers"], np.asarray(scene["planes"]), origins, directions,
      np.asarray(noise.jitter), np.asarray(noise.uniforms), mode=mode)
  np.testing.assert_allclose(out["rgb"], rgb, atol=3e-6)
  np.testing.assert_allclose(out["opacity"], opacity, atol=3e-6)
  np.testing.assert_allclose(out["depth"], depth, atol=1e-5)
  assert (np.min(depth) < 0) == (mode == "compatible")


def test_modes_differ_only_in_depth(scene):
  noise = renderer.deterministic_noise((3, RESOLUTION ** 2),
                                       renderer.RenderOptions(**SMALL))
  outs = [render_views(scene["params"], scene["planes"], scene["c2w"],
                       scene["intrinsics"], RESOLUTION, noise=noise,
                       options=renderer.RenderOptions(mode=mode, **SMALL))
          for mode in ("compatible", "clean")]
  np.testing.assert_allclose(outs[0]["rgb"], outs[1]["rgb"], atol=1e-6)
  np.testing.assert_allclose(outs[0]["opacity"], outs[1]["opacity"], atol=1e-6)
  assert np.abs(outs[0]["depth"] - outs[1]["depth"]).max() > 0.1


def test_full_sample_count_matches_reference(scene):
  """The released 64 + 64 samples, random noise, a background colour."""
  options = renderer.RenderOptions(background=(0.2, 0.5, 1.0), chunk_size=64)
  scene = dict(scene, c2w=scene["c2w"][:2], intrinsics=scene["intrinsics"][:2])
  noise = renderer.view_noise(jax.random.key(3), 2, RESOLUTION, None, options)
  _compare_with_reference(scene, options, noise)


def test_same_noise_same_bits_and_key_equals_its_noise(scene):
  options = renderer.RenderOptions(**SMALL)
  args = (scene["params"], scene["planes"], scene["c2w"], scene["intrinsics"],
          RESOLUTION)
  key = jax.random.key(11)
  noise = renderer.view_noise(key, 3, RESOLUTION, None, options)
  first = render_views(*args, noise=noise, options=options)
  second = render_views(*args, noise=jax.tree.map(jnp.copy, noise), options=options)
  from_key = render_views(*args, key=key, options=options)
  for name in first:
    np.testing.assert_array_equal(first[name], second[name])
    np.testing.assert_allclose(from_key[name], first[name], atol=1e-6, rtol=1e-6)
  other = render_views(*args, key=jax.random.key(12), options=options)
  assert np.abs(other["rgb"] - first["rgb"]).max() > 1e-4


def test_chunking_does_not_change_result(scene):
  args = (scene["params"], scene["planes"], scene["c2w"], scene["intrinsics"],
          RESOLUTION)
  key = jax.random.key(5)
  chunked = render_views(*args, key=key, options=renderer.RenderOptions(
      num_coarse=16, num_fine=16, chunk_size=7))
  whole = render_views(*args, key=key, options=renderer.RenderOptions(
      num_coarse=16, num_fine=16, chunk_size=10_000))
  for name in chunked:
    np.testing.assert_allclose(chunked[name], whole[name], atol=1e-6, rtol=1e-6)


def test_crop_equals_window_of_full_render(scene):
  # In the clean mode pixels do not depend on which other rays are rendered
  # (the compatible depth clamp does).
  options = renderer.RenderOptions(mode="clean", **SMALL)
  args = (scene["params"], scene["planes"], scene["c2w"][:2],
          scene["intrinsics"][:2], 8)
  key = jax.random.key(9)
  full = render_views(*args, key=key, options=options)
  crop = render_views(*args, (2, 3, 4), key=key, options=options)
  for name in full:
    np.testing.assert_allclose(crop[name], full[name][:, 3:7, 2:6], atol=1e-6)


def test_render_rays_is_one_view(scene):
  """render_rays of a view's rays equals that view of render_views."""
  options = renderer.RenderOptions(**SMALL)
  origins, directions = cameras.generate_rays(
      jnp.asarray(scene["c2w"][1]), jnp.asarray(scene["intrinsics"][1]), RESOLUTION)
  noise = renderer.view_noise(jax.random.key(2), 3, RESOLUTION, None, options)
  rays = jax.jit(renderer.render_rays, static_argnames="options")(
      scene["params"], scene["planes"], origins, directions,
      jax.tree.map(lambda x: x[1], noise), options=options)
  views = render_views(scene["params"], scene["planes"], scene["c2w"],
                       scene["intrinsics"], RESOLUTION, noise=noise, options=options)
  for name in rays:
    np.testing.assert_allclose(rays[name], views[name][1].reshape(rays[name].shape),
                               atol=1e-6)


def test_gradients_finite_and_nonzero(scene):
  """Gradients reach planes and decoder through rgb, depth and opacity, also
  where rays are empty (depth 0/0), and are the same with rematerialisation."""
  def loss(params, planes, options):
    out = renderer.render_views(params, planes, scene["c2w"], scene["intrinsics"], 4,
                                key=jax.random.key(0), options=options)
    return jnp.mean(out["rgb"] ** 2) + jnp.mean(out["depth"]) + jnp.mean(out["opacity"])

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  options = renderer.RenderOptions(num_coarse=8, num_fine=8, chunk_size=16)
  grads = grad(scene["params"], scene["planes"], options)
  for g in jax.tree.leaves(grads):
    assert np.all(np.isfinite(g))
    assert np.abs(g).max() > 0
  remat = grad(scene["params"], scene["planes"],
               dataclasses.replace(options, remat=True))
  for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(remat)):
    np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-7)


def test_bfloat16_close_to_float32(scene):
  args = (scene["params"], scene["planes"], scene["c2w"][:2],
          scene["intrinsics"][:2], RESOLUTION)
  fp32 = render_views(*args, options=renderer.RenderOptions(**SMALL))
  bf16 = render_views(*args, options=renderer.RenderOptions(
      mlp_dtype="bfloat16", planes_dtype="bfloat16", **SMALL))
  assert bf16["rgb"].dtype == jnp.float32
  np.testing.assert_allclose(bf16["rgb"], fp32["rgb"], atol=0.03)
  np.testing.assert_allclose(bf16["opacity"], fp32["opacity"], atol=0.03)


def test_sharded_equals_unsharded(scene):
  """Compatible mode: the per-view reductions must span the devices."""
  if jax.device_count() < 4:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=4")
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("rays",))
  options = renderer.RenderOptions(num_coarse=16, num_fine=16, chunk_size=8)
  crop = (1, 0, 5)  # 3 views x 25 rays: padded to 76
  args = (scene["params"], scene["planes"], scene["c2w"], scene["intrinsics"],
          RESOLUTION)
  key = jax.random.key(4)
  sharded = jax.jit(renderer.render_views_sharded,
                    static_argnames=("resolution", "mesh", "axis_name", "crop",
                                     "options"))(
      *args, mesh=mesh, axis_name="rays", crop=crop, key=key, options=options)
  plain = render_views(*args, crop, key=key, options=options)
  for name in plain:
    np.testing.assert_allclose(sharded[name], plain[name], atol=1e-6, rtol=1e-6)
  noise = renderer.view_noise(key, 3, RESOLUTION, crop, options)
  with_noise = jax.jit(renderer.render_views_sharded,
                       static_argnames=("resolution", "mesh", "axis_name", "crop",
                                        "options"))(
      *args, mesh=mesh, axis_name="rays", crop=crop, noise=noise, options=options)
  for name in plain:
    np.testing.assert_allclose(with_noise[name], plain[name], atol=1e-6, rtol=1e-6)
