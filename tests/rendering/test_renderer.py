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


# The rays render_views computes inside its jit. The compatible mode's in-box
# test is float32 arithmetic on them, so the reference must get these very
# rays: the reference's own (float64) rays differ by rounding steps, which move
# samples on the box surface in or out. test_rays_match_reference checks them.
view_rays = jax.jit(jax.vmap(cameras.generate_rays, in_axes=(0, 0, None, None)),
                    static_argnums=(2, 3))


def _reference_views(scene, noise, options, resolution=RESOLUTION, crop=None):
  """Renders each view with the NumPy reference; arrays [V, S*S, ...]."""
  all_origins, all_directions = view_rays(scene["c2w"], scene["intrinsics"],
                                          resolution, crop)
  outs = []
  for v in range(scene["c2w"].shape[0]):
    origins, directions = np.asarray(all_origins[v]), np.asarray(all_directions[v])
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


@pytest.mark.parametrize("crop", [None, (1, 2, 3)])
def test_rays_match_reference(scene, crop):
  origins, directions = view_rays(scene["c2w"], scene["intrinsics"], RESOLUTION, crop)
  for v in range(scene["c2w"].shape[0]):
    ref_origins, ref_directions = ref.rays_for_view(
        scene["c2w"][v], scene["intrinsics"][v], RESOLUTION, crop)
    # float32 against float64: a few rounding steps.
    np.testing.assert_allclose(origins[v], ref_origins, rtol=0, atol=3e-7)
    np.testing.assert_allclose(directions[v], ref_directions, rtol=0, atol=3e-7)


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


def test_released_geometry_rounds_like_float32_numpy():
  """Compatible depths and positions are the released float32 values bit for
  bit, under jit (where XLA would otherwise fuse products into sums)."""
  rng = np.random.default_rng(2)
  start = rng.uniform(0.5, 2.0, 300).astype(np.float32)
  end = rng.uniform(2.0, 4.0, 300).astype(np.float32)
  jitter = rng.uniform(0, 1, (300, 64)).astype(np.float32)
  jitter[:100] = 0
  origins = rng.uniform(-3, 3, (300, 3)).astype(np.float32)
  directions = rng.normal(size=(300, 3)).astype(np.float32)

  @jax.jit
  def geometry(start, end, jitter, origins, directions):
    depths = volume.stratified_depths(start, end, jitter, as_released=True)
    points = volume.sample_points(origins, directions, depths, as_released=True)
    return depths, points, volume.inside_box_points(points)

  depths, points, inside = geometry(start, end, jitter, origins, directions)
  depths = np.asarray(depths)
  steps = np.arange(64, dtype=np.float32) / np.float32(63)
  span = (end - start)[:, None]
  expected = start[:, None] + steps * span + jitter * (span / np.float32(63))
  # The grid (jitter 0) bit for bit; with jitter, XLA multiplies by 1/63
  # instead of dividing by 63: a rounding step at most.
  np.testing.assert_array_equal(depths[:100], expected[:100])
  np.testing.assert_allclose(depths, expected, rtol=2.4e-7, atol=0)
  # With jitter 0 the last depth is start + (end - start), not always end.
  assert np.any(depths[:100, -1] != end[:100])
  expected_points, expected_inside = ref.released_points(origins, directions, depths)
  np.testing.assert_array_equal(points, expected_points)
  np.testing.assert_array_equal(inside, expected_inside)
  assert 0 < expected_inside.sum() < expected_inside.size


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


def _face_rays():
  """Float32 rays of four 16x16 orbit views (radius 2, elevation 0.2).

  The top rows leave the box through its top face z = +1; with jitter 0 the
  samples at the box entry and exit lie on faces, and float32 rounding puts
  some of them just outside.
  """
  c2w = cameras.orbit_cameras(4, radius=2.0, elevation=0.2, azimuth_offset=0.1, xp=np)
  intrinsics = np.tile(cameras.DEFAULT_INTRINSICS[None], (4, 1))
  origins, directions = view_rays(c2w, intrinsics, 16, None)
  return np.asarray(origins).reshape(-1, 3), np.asarray(directions).reshape(-1, 3)


def test_face_samples_match_reference(scene):
  """Deterministic samples on the box faces are in or out as released.

  The released renderer tests float32 sample positions: a ray that leaves
  through a face loses its last sample (and last interval) when rounding puts
  it outside, which lowers the opacity by up to ~1e-2 here.
  """
  options = renderer.RenderOptions(**SMALL)
  origins, directions = _face_rays()
  noise = renderer.deterministic_noise((origins.shape[0],), options)
  jitter, uniforms = np.asarray(noise.jitter), np.asarray(noise.uniforms)
  # The rays exercise the rule: last samples rounded out of the top face and
  # of other faces, first samples rounded out of the entry face.
  _, end, hit, depths = ref.coarse_depths(origins, directions, jitter)
  _, inside = ref.released_points(origins, directions, depths)
  exit_z = origins[:, 2] + end * directions[:, 2]
  top_exit = hit & (np.abs(exit_z - 1) < 1e-5)
  last_out = hit & ~inside[:, -1]
  first_out = hit & ~inside[:, 0]
  assert np.sum(top_exit) >= 100 and np.sum(last_out & top_exit) >= 10
  assert np.sum(last_out & ~top_exit) >= 50 and np.sum(first_out) >= 3

  out = jax.jit(renderer.render_rays, static_argnames="options")(
      scene["params"], scene["planes"], origins, directions, noise, options=options)
  args = (scene["layers"], np.asarray(scene["planes"]), origins, directions,
          jitter, uniforms)
  rgb, depth, opacity = ref.render_view(*args)
  # float32 against float64 on the same float32 sample geometry.
  np.testing.assert_allclose(out["rgb"], rgb, atol=3e-6)
  np.testing.assert_allclose(out["opacity"], opacity, atol=3e-6)
  np.testing.assert_allclose(out["depth"], depth, atol=1e-5)
  # Counting the rounded-out samples as inside (the clean rule) changes these
  # pixels by far more than the tolerance.
  _, _, clean_opacity = ref.render_view(*args, mode="clean")
  changed = np.abs(clean_opacity - opacity) > 1e-4
  assert np.sum(changed & last_out & top_exit) >= 5
  assert not np.any(changed & ~last_out & ~first_out)


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


@pytest.mark.parametrize("random", [False, True])
def test_modes_differ_only_in_depth(scene, random):
  """Cameras outside the box: the modes differ in depth, and in colour only
  where the compatible mode rounds a surface sample out of the box (jitter 0)."""
  options = renderer.RenderOptions(**SMALL)
  if random:
    noise = renderer.view_noise(jax.random.key(8), 3, RESOLUTION, None, options)
  else:
    noise = renderer.deterministic_noise((3, RESOLUTION ** 2), options)
  outs = [render_views(scene["params"], scene["planes"], scene["c2w"],
                       scene["intrinsics"], RESOLUTION, noise=noise,
                       options=renderer.RenderOptions(mode=mode, **SMALL))
          for mode in ("compatible", "clean")]
  same = np.ones((3, RESOLUTION ** 2), bool)
  if not random:
    origins, directions = view_rays(scene["c2w"], scene["intrinsics"], RESOLUTION, None)
    for v in range(3):
      _, _, hit, depths = ref.coarse_depths(np.asarray(origins[v]),
                                            np.asarray(directions[v]),
                                            np.asarray(noise.jitter[v]))
      _, inside = ref.released_points(origins[v], directions[v], depths)
      same[v] = ~(hit & ~(inside[:, 0] & inside[:, -1]))
    assert np.sum(~same) >= 3
  rgb = [np.asarray(out["rgb"]).reshape(3, -1, 3) for out in outs]
  opacity = [np.asarray(out["opacity"]).reshape(3, -1) for out in outs]
  np.testing.assert_allclose(rgb[0][same], rgb[1][same], atol=1e-6)
  np.testing.assert_allclose(opacity[0][same], opacity[1][same], atol=1e-6)
  if not random:
    assert np.abs(opacity[0][~same] - opacity[1][~same]).max() > 1e-3
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
    # Two compilations may fuse the float32 sums differently: a few ulps apart.
    np.testing.assert_allclose(rays[name], views[name][1].reshape(rays[name].shape),
                               rtol=2e-6, atol=1e-6)


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
