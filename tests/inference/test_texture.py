"""Tests of UV unwrapping, texture baking, mesh cleanup and textured export."""

import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pygltflib
import pytest
import trimesh
from PIL import Image

from configs import infer as infer_configs
from vf3d_jax.inference import mesh as mesh_lib
from vf3d_jax.inference import pipeline
from vf3d_jax.inference import texture


def _colour(points):
  """A smooth colour field with detail finer than a coarse mesh's vertices."""
  return 0.5 + 0.4 * jnp.stack([jnp.sin(6 * points[:, 0]), jnp.cos(5 * points[:, 1]),
                                jnp.sin(7 * points[:, 2] + 1.0)], axis=-1)


@jax.jit
def _sphere(points):
  """Density 1 on the radius-0.6 sphere, ``_colour`` everywhere."""
  return 10.0 * (0.6 - jnp.linalg.norm(points, axis=-1)) + 1.0, _colour(points)


@jax.jit
def _sphere_and_speck(points):
  """The sphere plus a small blob far from it (a floater)."""
  main = 10.0 * (0.6 - jnp.linalg.norm(points, axis=-1)) + 1.0
  speck = 40.0 * (0.08 - jnp.linalg.norm(points - jnp.array([0.85, 0.85, 0.85]), axis=-1)) + 1.0
  return jnp.maximum(main, speck), _colour(points)


def _psnr(a, b):
  return -10.0 * np.log10(np.mean((np.asarray(a) - np.asarray(b)) ** 2))


def _surface_samples(mesh, count, seed=0):
  """Random points on the faces, with their UVs: ``(points [N, 3], uv [N, 2])``."""
  rng = np.random.default_rng(seed)
  faces = mesh.faces[rng.integers(0, len(mesh.faces), count)]
  weights = rng.dirichlet([1.0, 1.0, 1.0], count)
  points = np.einsum("nk,nkd->nd", weights, mesh.vertices[faces])
  uv = np.einsum("nk,nkd->nd", weights, mesh.uv[faces])
  return points.astype(np.float32), uv.astype(np.float32)


@pytest.fixture(scope="module")
def textured():
  mesh = mesh_lib.extract_mesh(_sphere, 48, chunk=48 ** 3)
  mesh = mesh_lib.simplify(mesh, 2000, _sphere)
  return texture.bake_texture(mesh, _sphere, texture_size=256)


def test_texels_hold_the_field_colour_at_surface_points(textured):
  assert textured.textured and textured.texture.shape == (256, 256, 3)
  assert textured.uv.shape == (len(textured.vertices), 2)
  assert textured.uv.min() >= 0 and textured.uv.max() <= 1
  points, uv = _surface_samples(textured, 4000)
  baked = texture.sample_texture(textured.texture, uv)
  field = mesh_lib.query_colors(_sphere, points)
  assert _psnr(baked, field) > 40.0  # 56 dB measured at 256^2
  # Interpolating vertex colours across ~2000 faces is far worse: the bake adds detail.
  faces_uv_free = mesh_lib.Mesh(textured.vertices, textured.faces, textured.vertex_colors)
  blended = texture.bake_texture(faces_uv_free, None, texture_size=256)
  assert _psnr(texture.sample_texture(blended.texture, uv), field) < _psnr(baked, field) - 6


def test_rasterize_covers_a_triangle_with_exact_barycentrics():
  uv = np.array([[0.1, 0.1], [0.9, 0.1], [0.1, 0.9]], np.float32)
  size = 64
  triangle, barycentric = texture.rasterize(uv, np.array([[0, 1, 2]]), size)
  covered = triangle == 0
  area = 0.5 * 0.8 * 0.8 * size * size
  assert abs(covered.sum() - area) < 0.08 * area  # border texels are conservative
  assert (triangle[~covered] == -1).all() and (barycentric[~covered] == 0).all()
  ys, xs = np.nonzero(covered)
  np.testing.assert_allclose(barycentric[ys, xs].sum(-1), 1.0, atol=1e-5)
  # Inside texels: the barycentric blend of the corners' UVs is the texel centre.
  centre = np.stack([(xs + 0.5) / size, 1.0 - (ys + 0.5) / size], axis=-1)
  blended = barycentric[ys, xs] @ uv
  inside = (barycentric[ys, xs] > 0.02).all(-1)
  np.testing.assert_allclose(blended[inside], centre[inside], atol=1e-5)


def test_dilate_fills_rings_around_the_filled_texels():
  image = np.zeros((9, 9, 3), np.float32)
  filled = np.zeros((9, 9), bool)
  image[4, 4], filled[4, 4] = (0.2, 0.4, 0.6), True
  out = texture.dilate(image, filled, 2)
  np.testing.assert_allclose(out[2:7, 2:7], np.broadcast_to([0.2, 0.4, 0.6], (5, 5, 3)), atol=1e-6)
  assert (out[0] == 0).all() and (out[:, 8] == 0).all()


def test_remove_floaters_drops_small_pieces_only():
  mesh = mesh_lib.extract_mesh(_sphere_and_speck, 64, chunk=64 ** 3)
  cleaned = mesh_lib.remove_floaters(mesh, 0.05)  # the speck is 1.7% of the faces
  assert len(trimesh.Trimesh(mesh.vertices, mesh.faces).split(only_watertight=False)) == 2
  pieces = trimesh.Trimesh(cleaned.vertices, cleaned.faces).split(only_watertight=False)
  assert len(pieces) == 1
  np.testing.assert_allclose(np.linalg.norm(cleaned.vertices, axis=-1), 0.6, atol=0.03)
  assert cleaned.faces.max() < len(cleaned.vertices) == len(np.unique(cleaned.faces))
  assert mesh_lib.remove_floaters(mesh, 0.0) is mesh
  # The largest piece is always kept, whatever the threshold.
  assert len(mesh_lib.remove_floaters(mesh, 0.99).faces) == len(cleaned.faces)


def test_clean_says_what_it_removed():
  mesh = mesh_lib.extract_mesh(_sphere_and_speck, 64, chunk=64 ** 3)
  cleaned, cleanup = mesh_lib.clean(mesh, 0.05, 2000, _sphere_and_speck)
  speck = len(mesh.faces) - len(mesh_lib.remove_floaters(mesh, 0.05).faces)
  assert (cleanup.raw_faces, cleanup.floaters, cleanup.floater_faces) == (len(mesh.faces), 1, speck)
  assert cleanup.faces == len(cleaned.faces) <= 2000
  assert cleanup.describe() == (f"{len(cleaned.faces):,} faces; 1 floater of {speck:,} faces "
                                f"removed; decimated from {len(mesh.faces) - speck:,}")
  _, kept = mesh_lib.clean(mesh, 0.0, 0)
  assert kept.describe() == f"{len(mesh.faces):,} faces"


def test_simplify_meets_the_budget_and_keeps_the_surface():
  mesh = mesh_lib.extract_mesh(_sphere, 64, chunk=64 ** 3)
  assert len(mesh.faces) > 10_000
  small = mesh_lib.simplify(mesh, 3000, _sphere)
  assert 2700 <= len(small.faces) <= 3000
  np.testing.assert_allclose(np.linalg.norm(small.vertices, axis=-1), 0.6, atol=0.01)
  np.testing.assert_allclose(small.vertex_colors, mesh_lib.query_colors(_sphere, small.vertices),
                             atol=1e-6)
  nearest = mesh_lib.simplify(mesh, 3000)  # no field: the nearest input vertex's colour
  assert np.abs(nearest.vertex_colors - small.vertex_colors).max() < 0.1
  assert mesh_lib.simplify(mesh, 0) is mesh and mesh_lib.simplify(mesh, 10 ** 6) is mesh


def _glb_json(path):
  data = open(path, "rb").read()
  magic, version, length = struct.unpack_from("<4sII", data)
  assert (magic, version, length) == (b"glTF", 2, len(data))
  chunk_length, chunk_type = struct.unpack_from("<I4s", data, 12)
  assert chunk_type == b"JSON"
  return json.loads(data[20:20 + chunk_length])


def test_glb_round_trip_and_a_second_reader(textured, tmp_path):
  path = tmp_path / "out" / "mesh.glb"
  assert mesh_lib.export_mesh(textured, path) == [str(path)]
  loaded = trimesh.load(path, force="mesh", process=False)
  assert loaded.visual.kind == "texture"
  assert len(loaded.faces) == len(textured.faces)
  np.testing.assert_allclose(loaded.vertices, textured.vertices, atol=1e-6)
  np.testing.assert_allclose(loaded.visual.uv, textured.uv, atol=1e-6)
  image = np.asarray(loaded.visual.material.baseColorTexture.convert("RGB"))
  np.testing.assert_array_equal(image, np.round(textured.texture * 255).astype(np.uint8))
  # The glTF itself, as a viewer's loader sees it: one textured PBR material on a
  # primitive with positions and TEXCOORD_0, the texture an embedded PNG.
  gltf = pygltflib.GLTF2().load(str(path))
  primitive = gltf.meshes[0].primitives[0]
  assert primitive.attributes.POSITION is not None and primitive.attributes.TEXCOORD_0 is not None
  material = gltf.materials[primitive.material]
  source = gltf.textures[material.pbrMetallicRoughness.baseColorTexture.index].source
  assert gltf.images[source].mimeType == "image/png"
  assert material.pbrMetallicRoughness.metallicFactor == 0
  assert gltf.accessors[primitive.attributes.TEXCOORD_0].count == len(textured.vertices)
  assert _glb_json(path)["asset"]["version"] == "2.0"


def test_obj_with_mtl_and_png(textured, tmp_path):
  path = tmp_path / "mesh.obj"
  written = mesh_lib.export_mesh(textured, path)
  assert sorted(os.path.basename(p) for p in written) == ["mesh.mtl", "mesh.obj", "mesh.png"]
  assert sorted(os.listdir(tmp_path)) == ["mesh.mtl", "mesh.obj", "mesh.png"]  # no temporaries
  mtl = (tmp_path / "mesh.mtl").read_text()
  assert "map_Kd mesh.png" in mtl and "Kd 1.0" in mtl
  loaded = trimesh.load(path, force="mesh", process=False)
  assert loaded.visual.kind == "texture" and len(loaded.faces) == len(textured.faces)
  atlas = np.asarray(Image.open(tmp_path / "mesh.png").convert("RGB"), np.float32) / 255
  points, uv = _surface_samples(textured, 2000, seed=1)
  assert _psnr(texture.sample_texture(atlas, uv), mesh_lib.query_colors(_sphere, points)) > 38


def test_ply_keeps_vertex_colours_of_a_textured_mesh(textured, tmp_path):
  loaded = trimesh.load(mesh_lib.export_mesh(textured, tmp_path / "m.ply")[0], process=False)
  assert loaded.visual.kind == "vertex"


def test_mesh_settings_are_checked():
  config = infer_configs.get_config("demo")
  config.mesh.format = "ply"
  with pytest.raises(ValueError, match="mesh.texture=uv needs mesh.format glb or obj"):
    pipeline.validate_config(config)
  for field, value, message in [("texture", "png", "mesh.texture must be uv or vertex"),
                                ("min_component", 1.5, "mesh.min_component"),
                                ("max_faces", -1, "mesh.max_faces"),
                                ("texture_size", 4, "mesh.texture_size")]:
    config = infer_configs.get_config("demo")
    config.mesh[field] = value
    with pytest.raises(ValueError, match=message):
      pipeline.validate_config(config)
