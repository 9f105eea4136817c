"""The fast mode: empty-space skipping and early termination against the other modes.

The field is planted: the planes hold the indicator of a centred square in
channel 0 and a colour ramp in channel 1, and the decoder gives high density
only where all three projections fall in the square (a cube of side 1 in the
box of side 2) and almost none elsewhere, so that most of the box is empty.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vf3d_jax.data import orbits
from vf3d_jax.rendering import renderer
from vf3d_jax.rendering import volume

RES = 48
COMPATIBLE = renderer.RenderOptions(chunk_size=4096)
FAST = renderer.RenderOptions(mode="fast", num_coarse=16, num_fine=16, chunk_size=512)


def _planted_field(size=32):
  centres = (np.arange(size) + 0.5) / size * 2 - 1  # the texel centres in [-1, 1]
  inside = (np.abs(centres) < 0.5).astype(np.float32)
  square = inside[:, None] * inside[None, :]
  ramp = np.broadcast_to((centres[None, :] + 1) / 2, (size, size))
  planes = np.stack([np.stack([square, ramp], axis=-1)] * 3).astype(np.float32)
  # hidden 0: sum of the three indicators - 2.5 (> 0 only inside the cube);
  # hidden 1, 2: the colour ramps of planes 0 and 2.
  k0 = np.zeros((6, 3), np.float32)
  k0[[0, 2, 4], 0] = 1.0
  k0[1, 1] = 1.0
  k0[5, 2] = 1.0
  k1 = np.zeros((3, 4), np.float32)
  k1[0, 0] = 60.0  # raw density 25 inside, -10 outside
  k1[1, 1] = k1[2, 2] = 4.0
  decoder = {"net_0": {"kernel": k0, "bias": np.array([-2.5, 0, 0], np.float32)},
             "net_2": {"kernel": k1, "bias": np.array([-10.0, -2, -2, 0], np.float32)}}
  return jax.tree.map(jnp.asarray, decoder), jnp.asarray(planes)


@pytest.fixture(scope="module")
def scene():
  decoder, planes = _planted_field()
  azimuth = np.linspace(0.3, 0.3 + 2 * np.pi, 3, endpoint=False)
  c2w, intrinsics = orbits.cameras_from_angles(azimuth, np.full(3, 0.4), 2.7, 40.0)
  return decoder, planes, jnp.asarray(c2w), jnp.asarray(intrinsics)


_render = jax.jit(renderer.render_views, static_argnames=("resolution", "crop", "options"))
_grid = jax.jit(renderer.occupancy_grid, static_argnames=("options",))


def _psnr(a, b):
  return float(-10 * np.log10(np.mean(np.square(np.asarray(a) - np.asarray(b)))))


def test_the_grid_holds_the_cube_and_its_dilation(scene):
  decoder, planes, _, _ = scene
  grid = np.asarray(_grid(decoder, planes, options=FAST))
  assert grid.shape == (64, 64, 64) and grid.dtype == bool
  # The cube [-0.5, 0.5]^3 is cells 16..47 a side; its bilinear edge reaches a texel
  # (2 cells) further, and the dilation one more.
  lo, hi = np.argwhere(grid).min(0), np.argwhere(grid).max(0)
  assert (lo >= 12).all() and (lo <= 15).all() and (hi >= 48).all() and (hi <= 51).all()
  assert grid[16:48, 16:48, 16:48].all()
  assert 0.1 < grid.mean() < 0.3
  undilated = np.asarray(_grid(decoder, planes, options=renderer.RenderOptions(
      mode="fast", occupancy_dilation=0)))
  assert undilated.sum() < grid.sum() and not (undilated & ~grid).any()


def test_fast_matches_compatible_on_a_quarter_of_the_samples(scene):
  decoder, planes, c2w, intrinsics = scene
  reference = _render(decoder, planes, c2w, intrinsics, resolution=RES, options=COMPATIBLE)
  fast = _render(decoder, planes, c2w, intrinsics, resolution=RES, options=FAST)
  assert float(jnp.mean(reference["opacity"] > 0.5)) > 0.1  # the cube is in view
  # Measured: 49 dB with 16 + 16 samples against 64 + 64.
  assert _psnr(fast["rgb"], reference["rgb"]) > 40.0
  assert float(jnp.max(jnp.abs(fast["opacity"] - reference["opacity"]))) < 0.1
  seen = np.asarray(reference["opacity"] > 0.99)
  np.testing.assert_allclose(np.asarray(fast["depth"])[seen], np.asarray(reference["depth"])[seen],
                             atol=0.02)


def test_with_every_cell_occupied_it_is_the_clean_mode(scene):
  """The occupied length is then the depth less the start: the same samples.

  Up to the last interval: the clean mode masks a jittered sample that falls
  behind the box, the fast mode clamps it to the box's end, which moves a
  grazing ray's opacity by up to 2e-4 (measured).
  """
  decoder, planes, c2w, intrinsics = scene
  full = jnp.ones((64, 64, 64), bool)
  options = renderer.RenderOptions(mode="fast", num_coarse=16, num_fine=16, termination=0.0,
                                   chunk_size=1024)
  clean = dict(options.__dict__, mode="clean")
  key = jax.random.key(3)
  fast = _render(decoder, planes, c2w, intrinsics, resolution=RES, options=options,
                 occupancy=full, key=key)
  reference = _render(decoder, planes, c2w, intrinsics, resolution=RES,
                      options=renderer.RenderOptions(**clean), key=key)
  for name in ("rgb", "opacity"):
    np.testing.assert_allclose(fast[name], reference[name], atol=5e-4, err_msg=name)
  # Depth is a weighted mean, defined where something is seen.
  seen = np.asarray(reference["opacity"] > 0.5)
  assert seen.mean() > 0.1
  np.testing.assert_allclose(np.asarray(fast["depth"])[seen], np.asarray(reference["depth"])[seen],
                             atol=1e-4)


def test_an_empty_grid_renders_the_background_without_a_sample(scene):
  decoder, planes, c2w, intrinsics = scene
  out = _render(decoder, planes, c2w, intrinsics, resolution=RES, options=FAST,
                occupancy=jnp.zeros((64, 64, 64), bool))
  np.testing.assert_array_equal(out["rgb"], np.ones((3, RES, RES, 3), np.float32))
  np.testing.assert_array_equal(out["opacity"], np.zeros((3, RES, RES), np.float32))


def test_chunks_sorting_and_crops_change_no_pixel(scene):
  decoder, planes, c2w, intrinsics = scene
  key = jax.random.key(0)
  grid = _grid(decoder, planes, options=FAST)
  base = _render(decoder, planes, c2w, intrinsics, resolution=RES, options=FAST, key=key,
                 occupancy=grid)
  other = renderer.RenderOptions(**dict(FAST.__dict__, chunk_size=4096))
  rechunked = _render(decoder, planes, c2w, intrinsics, resolution=RES, options=other, key=key,
                      occupancy=grid)
  crop = (8, 16, 24)
  cropped = _render(decoder, planes, c2w, intrinsics, resolution=RES, crop=crop, options=FAST,
                    key=key, occupancy=grid)
  built_inside = _render(decoder, planes, c2w, intrinsics, resolution=RES, options=FAST, key=key)
  # The same samples in another order of rays: float rounding only.
  for name in ("rgb", "opacity", "depth"):
    np.testing.assert_allclose(rechunked[name], base[name], atol=1e-5, err_msg=name)
    np.testing.assert_allclose(built_inside[name], base[name], atol=1e-5, err_msg=name)
    window = np.asarray(base[name])[:, 16:40, 8:32]
    np.testing.assert_allclose(cropped[name], window, atol=1e-5, err_msg=name)


def test_gradients_reach_the_planes_and_equal_the_clean_modes_when_all_is_occupied(scene):
  decoder, planes, c2w, intrinsics = scene
  target = jnp.full((1, 24, 24, 3), 0.3)

  def loss(planes, options, occupancy):
    out = renderer.render_views(decoder, planes, c2w[:1], intrinsics[:1], resolution=24,
                                options=options, occupancy=occupancy)
    return jnp.mean(jnp.square(out["rgb"] - target)) + jnp.mean(out["opacity"])

  grad = jax.jit(jax.grad(loss), static_argnames=("options",))
  fast = grad(planes, FAST, None)
  assert bool(jnp.all(jnp.isfinite(fast))) and float(jnp.abs(fast).sum()) > 0
  # The cube's texels get gradient; texels no occupied cell reaches get none.
  assert float(jnp.abs(fast[:, 2:6, 2:6]).max()) == 0.0
  options = renderer.RenderOptions(mode="fast", num_coarse=16, num_fine=16, termination=0.0,
                                   chunk_size=256)
  clean = renderer.RenderOptions(**dict(options.__dict__, mode="clean"))
  everywhere = grad(planes, options, jnp.ones((64, 64, 64), bool))
  np.testing.assert_allclose(everywhere, grad(planes, clean, None), atol=1e-5)


def test_sharded_fast_render_equals_unsharded(scene):
  decoder, planes, c2w, intrinsics = scene
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("rays",))
  sharded = jax.jit(renderer.render_views_sharded,
                    static_argnames=("resolution", "mesh", "axis_name", "options"))
  key = jax.random.key(1)
  out = sharded(decoder, planes, c2w, intrinsics, resolution=RES, mesh=mesh, axis_name="rays",
                options=FAST, key=key)
  plain = _render(decoder, planes, c2w, intrinsics, resolution=RES, options=FAST, key=key)
  for name in ("rgb", "opacity", "depth"):  # rays sorted per shard: float rounding only
    np.testing.assert_allclose(out[name], plain[name], atol=1e-5, err_msg=name)


def test_occupied_depths_lay_the_spans_end_to_end():
  # Probes of [0, 8): segments of length 1; occupied: [1, 3) and [5, 6).
  occupied = jnp.array([0, 1, 1, 0, 0, 1, 0, 0], bool)
  start, end = jnp.float32(0.0), jnp.float32(8.0)
  assert float(volume.occupied_length(occupied, start, end)) == 3.0
  s = jnp.array([0.0, 0.5, 1.0, 1.99, 2.0, 2.5, 3.0])
  np.testing.assert_allclose(volume.occupied_depths(s, occupied, start, end),
                             [1.0, 1.5, 2.0, 2.99, 5.0, 5.5, 6.0], atol=1e-6)
  # No occupied probe: everything maps to the end.
  none = volume.occupied_depths(s, jnp.zeros(8, bool), start, end)
  np.testing.assert_array_equal(none, np.full(7, 8.0, np.float32))


def test_termination_and_options():
  weights = jnp.array([0.5, 0.4, 0.0995, 0.0004, 0.0001])
  # Transmittance in front: 1, 0.5, 0.1, 0.0005, 0.0001.
  np.testing.assert_array_equal(volume.alive_intervals(weights, 1e-3),
                                [True, True, True, False, False])
  assert renderer.RenderOptions(mode="fast").probes == 128
  assert renderer.RenderOptions(mode="fast", num_probes=96).probes == 96
  with pytest.raises(ValueError, match="termination"):
    renderer.RenderOptions(mode="fast", termination=1.0)
  with pytest.raises(ValueError, match="occupancy_resolution"):
    renderer.RenderOptions(mode="fast", occupancy_resolution=0)
  with pytest.raises(ValueError, match="occupancy_subdivision"):
    renderer.RenderOptions(mode="fast", occupancy_subdivision=0)


def test_a_corner_lattice_grid_is_within_the_finer_one(scene):
  """Subdivision 1 queries only the cells' corners: a subset of subdivision 2's points."""
  decoder, planes, _, _ = scene
  corners = renderer.RenderOptions(mode="fast", occupancy_subdivision=1, occupancy_dilation=0)
  finer = renderer.RenderOptions(mode="fast", occupancy_subdivision=2, occupancy_dilation=0)
  a, b = (np.asarray(_grid(decoder, planes, options=o)) for o in (corners, finer))
  assert a.shape == b.shape == (64,) * 3 and a.any() and not (a & ~b).any()
  assert a[20:44, 20:44, 20:44].all()


def test_work_counts(scene):
  decoder, planes, c2w, intrinsics = scene
  compatible = renderer.count_work(decoder, planes, c2w, intrinsics, RES, COMPATIBLE)
  rays = 3 * RES * RES
  assert compatible["rays"] == rays and compatible["chunks_run"] == compatible["chunks"] == 2
  assert compatible["mlp_evaluations"] == 2 * 4096 * 128
  assert compatible["plane_lookups"] == 3 * compatible["mlp_evaluations"]
  fast = renderer.count_work(decoder, planes, c2w, intrinsics, RES, FAST)
  grid = np.asarray(_grid(decoder, planes, options=FAST))
  assert fast["occupied_fraction"] == pytest.approx(grid.mean())
  assert 0 < fast["active_rays"] < fast["rays_in_box"] <= rays
  assert fast["chunks_run"] == -(-fast["active_rays"] // 512) < fast["chunks"]
  assert fast["mlp_evaluations"] == fast["chunks_run"] * 512 * 32
  assert fast["grid_evaluations"] == 129 ** 3 and fast["occupancy_probes"] == rays * 128
  # The dilated cube is about 0.6 of the box a side, and many rays in the box pass it by
  # (measured: 0.17 of the in-box length is occupied).
  assert 0.1 < fast["occupied_length_fraction"] < 0.3


PROPOSAL = renderer.RenderOptions(mode="fast", proposal=True, num_coarse=64, num_fine=16,
                                  chunk_size=512)
_field = jax.jit(renderer.occupancy_field, static_argnames=("options",))


def test_the_lattice_lookup_is_trilinear():
  # A trilinear function of the coordinates is reproduced exactly between lattice points.
  axis = np.linspace(-1, 1, 9, dtype=np.float32)
  x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
  lattice = jnp.asarray(1 + 2 * x - y + 0.5 * z + x * y * z)
  points = np.random.default_rng(0).uniform(-1, 1, (200, 3)).astype(np.float32)
  px, py, pz = points.T
  np.testing.assert_allclose(volume.lattice_lookup(lattice, jnp.asarray(points)),
                             1 + 2 * px - py + 0.5 * pz + px * py * pz, atol=1e-5)
  # Outside the box: the nearest face's values.
  np.testing.assert_allclose(volume.lattice_lookup(lattice, jnp.asarray([[3.0, 0.0, 0.0]])),
                             [3.0], atol=1e-6)


def test_the_proposal_pass_decodes_a_quarter_of_the_samples_of_16_16(scene):
  decoder, planes, c2w, intrinsics = scene
  field = _field(decoder, planes, options=PROPOSAL)
  assert field.raw.shape == (129,) * 3 and field.occupied.shape == (64,) * 3
  np.testing.assert_array_equal(field.occupied, _grid(decoder, planes, options=PROPOSAL))
  reference = _render(decoder, planes, c2w, intrinsics, resolution=RES, options=COMPATIBLE)
  out = _render(decoder, planes, c2w, intrinsics, resolution=RES, options=PROPOSAL,
                occupancy=field)
  assert _psnr(out["rgb"], reference["rgb"]) > 40.0  # measured: 53 dB
  work = renderer.count_work(decoder, planes, c2w, intrinsics, RES, PROPOSAL, field)
  assert work["mlp_evaluations"] == work["chunks_run"] * 512 * 16
  assert work["lattice_lookups"] == work["chunks_run"] * 512 * 64
  with pytest.raises(ValueError, match="occupancy_field"):
    _render(decoder, planes, c2w, intrinsics, resolution=RES, options=PROPOSAL,
            occupancy=field.occupied)
  with pytest.raises(ValueError, match="num_fine"):
    renderer.RenderOptions(mode="fast", proposal=True, num_fine=0)


def test_the_proposal_pass_is_differentiable(scene):
  decoder, planes, c2w, intrinsics = scene
  target = jnp.full((1, 24, 24, 3), 0.3)

  def loss(planes):
    out = renderer.render_views(decoder, planes, c2w[:1], intrinsics[:1], resolution=24,
                                options=PROPOSAL)
    return jnp.mean(jnp.square(out["rgb"] - target)) + jnp.mean(out["opacity"])

  grad = jax.jit(jax.grad(loss))(planes)
  assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).sum()) > 0
