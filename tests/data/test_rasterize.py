"""The mesh rasteriser against analytic geometry, and mesh file loading."""

import numpy as np
import trimesh
from PIL import Image

from vf3d_jax.data import meshes
from vf3d_jax.data import orbits
from vf3d_jax.data import procedural
from vf3d_jax.data import rasterize
from vf3d_jax.data import raytrace


def _pixel_directions(c2w, intrinsics, resolution):
  """``[R, R, 3]`` unit ray directions through pixel centres (OpenGL camera)."""
  fx, fy, cx, cy = np.asarray(intrinsics, float)
  j, i = np.meshgrid(np.arange(resolution), np.arange(resolution))
  local = np.stack([((j + 0.5) / resolution - cx) / fx, -((i + 0.5) / resolution - cy) / fy,
                    -np.ones(j.shape)], -1)
  directions = local @ np.asarray(c2w, float)[:3, :3].T
  return directions / np.linalg.norm(directions, axis=-1, keepdims=True)


def test_icosphere_matches_the_analytic_sphere(tmp_path):
  sphere = trimesh.creation.icosphere(subdivisions=4)  # 5120 faces, radius 1
  sphere.visual.vertex_colors = np.tile([204, 51, 25, 255], (len(sphere.vertices), 1))
  path = str(tmp_path / "sphere.ply")
  sphere.export(path)
  mesh = meshes.load_mesh(path, up_axis="z")
  assert mesh.num_faces == 5120
  np.testing.assert_allclose(mesh.corner_colors[0, 0], [0.8, 0.2, 0.098], atol=0.01)
  c2w, intrinsics = orbits.cameras_from_angles([0.3, 2.5], [0.2, 0.6], 3.0, 50.0)
  rgba_mesh, depth_mesh = rasterize.render_mesh(mesh, c2w, intrinsics, 48)
  analytic = procedural.Primitive("sphere", np.zeros(3), np.eye(3), np.ones(3),
                                  mesh.corner_colors[0, 0].astype(float), np.zeros(3))
  rgba_ref, depth_ref = raytrace.render_assets(procedural.pack_assets([[analytic]], 1),
                                               c2w[None], intrinsics[None], 48, 1)
  rgba_mesh, rgba_ref = np.asarray(rgba_mesh), np.asarray(rgba_ref[0])
  hit_mesh, hit_ref = rgba_mesh[..., 3] > 0, rgba_ref[..., 3] > 0
  # The inscribed polyhedron loses at most a sliver of rim pixels.
  assert hit_ref.sum() > 1000
  assert np.sum(hit_mesh & ~hit_ref) == 0
  assert np.sum(hit_ref & ~hit_mesh) <= 0.01 * hit_ref.sum()
  both = hit_mesh & hit_ref
  # Facets sag below the sphere by < 0.002 of the radius; along a ray that
  # is divided by the cosine of the incidence angle.
  for view in range(2):
    directions = _pixel_directions(c2w[view], intrinsics[view], 48)
    depth_ref_view = np.asarray(depth_ref[0, view])
    finite_depth = np.where(np.isfinite(depth_ref_view), depth_ref_view, 0)
    points = c2w[view, :3, 3] + finite_depth[..., None] * directions
    cosine = -np.sum(points * directions, -1)
    mask = both[view]
    np.testing.assert_array_less(
        np.abs(np.asarray(depth_mesh[view])[mask] - depth_ref_view[mask]),
        0.002 / np.maximum(cosine[mask], 0.05) + 1e-4)
  # Flat facets versus smooth normals: close, not equal.
  assert np.abs(rgba_mesh[both, :3] - rgba_ref[both, :3]).mean() < 0.02


def test_textures_are_perspective_correct(tmp_path):
  # A square in the plane y = 0 (u along x, v along z) seen obliquely; the
  # texture encodes (u, v) so every pixel can be checked against the uv of
  # its ray's hit point, computed here from the plane.
  size = 256
  ramp = (np.arange(size) + 0.5) / size
  texture = np.zeros((size, size, 3))
  texture[..., 0] = ramp[None, :]              # u: left to right
  texture[..., 1] = ramp[::-1, None]           # v: bottom to top (row 0 is v = 1)
  texture[..., 2] = 1.0
  vertices = np.array([[-1, 0, -1], [1, 0, -1], [1, 0, 1], [-1, 0, 1]], float)
  quad = trimesh.Trimesh(vertices, [[0, 1, 2], [0, 2, 3]], process=False)
  quad.visual = trimesh.visual.TextureVisuals(
      uv=(vertices[:, [0, 2]] + 1) / 2, material=trimesh.visual.material.PBRMaterial(
          baseColorTexture=Image.fromarray(np.round(texture * 255).astype(np.uint8)),
          baseColorFactor=[255, 255, 255, 255]))
  path = str(tmp_path / "quad.glb")
  quad.export(path)
  mesh = meshes.load_mesh(path, up_axis="z", texture_size=size)
  c2w, intrinsics = orbits.cameras_from_angles([-1.0], [0.5], 2.2, 60.0)
  resolution = 40
  # A window as large as the image keeps the two triangles whole, so affine
  # (not perspective-correct) interpolation would be far off.
  rgba, depth = rasterize.render_mesh(mesh, c2w, intrinsics, resolution, window=resolution + 1)
  rgba = np.asarray(rgba[0])
  # Independent rays through pixel centres and their hits on the plane y = 0.
  directions = _pixel_directions(c2w[0], intrinsics[0], resolution)
  origin = c2w[0, :3, 3].astype(float)
  t = -origin[1] / directions[..., 1]
  points = origin + t[..., None] * directions
  expected_hit = (np.abs(points[..., 0]) < 1) & (np.abs(points[..., 2]) < 1)
  hit = rgba[..., 3] > 0
  margin = (np.abs(np.abs(points[..., 0]) - 1) > 0.02) & (np.abs(np.abs(points[..., 2]) - 1) > 0.02)
  np.testing.assert_array_equal(hit[margin], expected_hit[margin])
  inside = hit & expected_hit & margin
  assert inside.sum() > 300
  # Shading is one grey factor over a flat face: divide it out with blue = 1.
  u = rgba[inside, 0] / rgba[inside, 2]
  v = rgba[inside, 1] / rgba[inside, 2]
  np.testing.assert_allclose(u, ((points[..., 0] + 1) / 2)[inside], atol=0.01)
  np.testing.assert_allclose(v, ((points[..., 2] + 1) / 2)[inside], atol=0.01)
  np.testing.assert_allclose(np.asarray(depth[0])[inside], t[inside], rtol=1e-4)


def test_large_triangles_are_split_to_fit_the_window():
  corners = np.array([[[-1, 0, -1], [1, 0, -1], [1, 0, 1]]], np.float32)
  mesh = meshes.MeshAsset("tri", "", corners, np.ones((1, 3, 3), np.float32),
                          np.zeros((1, 3, 2), np.float32), np.full(1, -1, np.int32),
                          np.ones((1, 1, 1, 3), np.float32))
  c2w, intrinsics = orbits.cameras_from_angles([-np.pi / 2], [0.0], 3.0, 50.0)
  fitted = rasterize.fit_to_window(mesh, c2w, intrinsics, 64, 8)
  assert fitted.num_faces > 16
  # Subdivision keeps the surface: same total area.
  def area(c):
    return 0.5 * np.linalg.norm(np.cross(c[:, 1] - c[:, 0], c[:, 2] - c[:, 0]), axis=-1).sum()
  np.testing.assert_allclose(area(fitted.corners), area(corners), rtol=1e-5)
