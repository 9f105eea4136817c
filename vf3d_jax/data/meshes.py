"""Real meshes (.obj, .glb/.gltf, .ply, ... via trimesh) as renderable arrays.

A mesh becomes per-face-corner arrays, so faces from several sub-meshes with
different materials sit side by side:

* ``corners [F, 3, 3]`` world positions, normalised so the bounding box is
  centred at the origin with its longest side spanning ``[-1, 1]``;
* ``corner_colors [F, 3, 3]`` rgb in ``[0, 1]``: vertex or face colours, or the
  material's base-colour factor;
* ``corner_uvs [F, 3, 2]`` texture coordinates (``v`` up, trimesh's convention);
* ``face_texture [F]`` index into ``textures`` or -1 for untextured faces;
* ``textures [K, T, T, 3]`` base-colour images in ``[0, 1]``, resized to one size
  (``K >= 1``; a 1x1 white image when the mesh has none).

The albedo of a point is its interpolated corner colour times its texture
sample. glTF and most OBJ files are y-up; they are turned so ``+y`` becomes the
world's ``+z`` (``up_axis="y"``).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

_Y_UP_TO_Z_UP = np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], np.float64)


@dataclasses.dataclass(frozen=True)
class MeshAsset:
  """A triangle soup with colours and textures, in the normalised box."""
  # Identifier (the file stem by default).
  asset_id: str
  # Description of the asset ('' when unknown).
  caption: str
  # [F, 3, 3] float32 corner positions.
  corners: np.ndarray
  # [F, 3, 3] float32 corner colours.
  corner_colors: np.ndarray
  # [F, 3, 2] float32 corner texture coordinates.
  corner_uvs: np.ndarray
  # [F] int32 texture index, -1 for none.
  face_texture: np.ndarray
  # [K, T, T, 3] float32 textures.
  textures: np.ndarray

  @property
  def num_faces(self) -> int:
    return int(self.corners.shape[0])


def _to_rgb(color) -> np.ndarray:
  color = np.asarray(color, np.float64).reshape(-1)[:3]
  return color / 255.0 if color.max(initial=0.0) > 1.0 else color


def _texture_array(image, size: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not isinstance(image, Image.Image):
    image = Image.fromarray(np.asarray(image))
  image = image.convert("RGB").resize((size, size), Image.BILINEAR)
  return np.asarray(image, np.float32) / 255.0


def _geometry_arrays(geometry, textures: list, texture_size: int):
  """Per-corner arrays of one ``trimesh.Trimesh``."""
  import trimesh  # pylint: disable=g-import-not-at-top
  faces = np.asarray(geometry.faces, np.int64)
  vertices = np.asarray(geometry.vertices, np.float64)
  count = faces.shape[0]
  corners = vertices[faces]
  colors = np.ones((count, 3, 3))
  uvs = np.zeros((count, 3, 2))
  texture_index = np.full(count, -1, np.int32)
  visual = geometry.visual
  if isinstance(visual, trimesh.visual.texture.TextureVisuals):
    material = visual.material
    if isinstance(material, trimesh.visual.material.PBRMaterial):
      # glTF: base colour = factor x texture.
      image = material.baseColorTexture
      if material.baseColorFactor is not None:
        colors *= _to_rgb(material.baseColorFactor)
    else:
      # OBJ/MTL: the diffuse map replaces Kd (as Blender imports it).
      image = getattr(material, "image", None)
      if image is None and getattr(material, "diffuse", None) is not None:
        colors *= _to_rgb(material.diffuse)
    if image is not None and visual.uv is not None and len(visual.uv) == len(vertices):
      textures.append(_texture_array(image, texture_size))
      texture_index[:] = len(textures) - 1
      uvs = np.asarray(visual.uv, np.float64)[faces]
  elif isinstance(visual, trimesh.visual.color.ColorVisuals):
    if visual.kind == "vertex":
      colors = np.asarray(visual.vertex_colors, np.float64)[faces][..., :3] / 255.0
    elif visual.kind == "face":
      colors = np.repeat(np.asarray(visual.face_colors, np.float64)[:, None, :3] / 255.0, 3, 1)
    else:
      colors *= 0.7  # trimesh's default grey; untinted geometry.
  return corners, colors, uvs, texture_index


def load_mesh(path: str, *, asset_id: str | None = None, caption: str = "",
              up_axis: str = "y", texture_size: int = 512) -> MeshAsset:
  """Loads a mesh file and normalises it into ``[-1, 1]^3``.

  Args:
    path: any file trimesh reads (.obj with .mtl, .glb, .gltf, .ply, .stl, ...).
    asset_id: identifier; the file stem by default.
    caption: description stored with the renders.
    up_axis: ``"y"`` (glTF, most OBJ) or ``"z"``: the file's up direction.
    texture_size: side every base-colour texture is resized to.

  Returns:
    A ``MeshAsset``.

  Raises:
    FileNotFoundError: there is no such file.
    ValueError: ``up_axis`` is neither ``"y"`` nor ``"z"``, or the file cannot
      be read as a mesh, holds no triangles or has a degenerate bounding box
      (a message that starts with the path).
  """
  if up_axis not in ("y", "z"):
    raise ValueError(f"up_axis must be 'y' or 'z', got {up_axis!r}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no mesh file {path}")
  try:
    return _load_mesh(path, asset_id, caption, up_axis, texture_size)
  except Exception as error:  # pylint: disable=broad-except
    # A broken file makes trimesh raise almost anything: say which file it was.
    message = " ".join(str(error).split())
    if not isinstance(error, ValueError):
      message = f"cannot read it ({type(error).__name__}: {message})"
    raise ValueError(f"{path}: {message}") from error


def _load_mesh(path: str, asset_id: str | None, caption: str, up_axis: str,
               texture_size: int) -> MeshAsset:
  import trimesh  # pylint: disable=g-import-not-at-top
  loaded = trimesh.load(path, force="scene", process=False)
  geometries = [g for g in loaded.dump(concatenate=False)
                if isinstance(g, trimesh.Trimesh) and len(g.faces)]
  if not geometries:
    raise ValueError("no triangles")
  textures = []
  parts = [_geometry_arrays(g, textures, texture_size) for g in geometries]
  corners, colors, uvs, texture_index = (np.concatenate(x) for x in zip(*parts))
  if up_axis == "y":
    corners = corners @ _Y_UP_TO_Z_UP.T
  corners = normalize_corners(corners)
  if not textures:
    textures = [np.ones((1, 1, 3), np.float32)]
  return MeshAsset(
      asset_id=asset_id or os.path.splitext(os.path.basename(path))[0], caption=caption,
      corners=corners.astype(np.float32), corner_colors=np.clip(colors, 0, 1).astype(np.float32),
      corner_uvs=uvs.astype(np.float32), face_texture=texture_index.astype(np.int32),
      textures=np.stack(textures).astype(np.float32))


def normalize_corners(corners: np.ndarray) -> np.ndarray:
  """Centres the bounding box at the origin and scales its longest side to 2."""
  lower = corners.reshape(-1, 3).min(axis=0)
  upper = corners.reshape(-1, 3).max(axis=0)
  extent = float(np.max(upper - lower))
  if not np.isfinite(extent) or extent <= 0:
    raise ValueError("degenerate mesh: empty or zero-size bounding box")
  return (corners - (lower + upper) / 2) * (2.0 / extent)


def subdivide_faces(mesh: MeshAsset, mask: np.ndarray) -> MeshAsset:
  """Splits the faces in ``mask`` into four at their edge midpoints.

  Colours and texture coordinates are affine over a flat triangle, so the
  midpoint values are exact.
  """
  mask = np.asarray(mask, bool)
  if not mask.any():
    return mesh
  def split(x):
    big = x[mask]
    a, b, c = big[:, 0], big[:, 1], big[:, 2]
    ab, bc, ca = (a + b) / 2, (b + c) / 2, (c + a) / 2
    children = np.stack([np.stack([a, ab, ca], 1), np.stack([ab, b, bc], 1),
                         np.stack([ca, bc, c], 1), np.stack([ab, bc, ca], 1)], 1)
    return np.concatenate([x[~mask], children.reshape((-1,) + x.shape[1:])])
  return dataclasses.replace(
      mesh, corners=split(mesh.corners), corner_colors=split(mesh.corner_colors),
      corner_uvs=split(mesh.corner_uvs),
      face_texture=np.concatenate([mesh.face_texture[~mask],
                                   np.repeat(mesh.face_texture[mask], 4)]))
