"""The multi-view record: one ``tf.train.Example`` per asset.

Layout (flat feature keys, exactly what TFDS writes for ``tfds_features()``,
so ``tfds.data_source`` decodes the same records):

==========================  ============  ==========================================
key                         type          meaning
==========================  ============  ==========================================
``id``                      bytes         asset identifier
``caption``                 bytes         UTF-8 description
``source``                  bytes         ``3d`` (rendered asset) or ``synthetic``
                                          (generated video)
``quality``                 float         quality score, NaN if none
``elevation_estimate``      float         orbit elevation in radians: exact for
                                          renders, estimated for synthetic
                                          videos, NaN if unknown
``num_orbit_views``         int64         the first views form the orbit
``views/rgba``              bytes x V     RGBA PNG, straight alpha (readers also
                                          accept RGB: alpha 1)
``views/c2w``               float x 16V   ``[V, 4, 4]`` OpenGL camera-to-world
``views/intrinsics``        float x 4V    ``[V, 4]`` normalised (fx, fy, cx, cy)
``views/azimuth``           float x V     radians
``views/elevation``         float x V     radians
``surface/points``          float x 3N    optional: ``[N, 3]`` points on the true
                                          surface, world frame, uniform by area
                                          (evaluation benchmarks; not in
                                          ``tfds_features()``, which skips it)
==========================  ============  ==========================================

Protos come from the copy bundled with tensorflow-datasets; TensorFlow is not
needed to write or read them.
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Sequence

import numpy as np
from PIL import Image

from tensorflow_datasets.proto import tf_example_generated_pb2 as example_pb2
from tensorflow_datasets.proto import tf_feature_generated_pb2 as feature_pb2

SOURCES = ("3d", "synthetic")
_REQUIRED = ("id", "caption", "source", "views/rgba", "views/c2w", "views/intrinsics",
             "views/azimuth", "views/elevation")


class BadRecordError(ValueError):
  """A record that cannot be used: corrupt, truncated or inconsistent."""


@dataclasses.dataclass
class MultiViewRecord:
  """One asset's views, in memory."""
  # Asset identifier.
  asset_id: str
  # Description of the asset.
  caption: str
  # '3d' or 'synthetic'.
  source: str
  # V PNG-encoded images (RGBA or RGB).
  images: Sequence[bytes]
  # [V, 4, 4] float32 camera-to-world.
  c2w: np.ndarray
  # [V, 4] float32 normalised intrinsics.
  intrinsics: np.ndarray
  # [V] float32 radians.
  azimuth: np.ndarray
  # [V] float32 radians.
  elevation: np.ndarray
  # Views that form the orbit (the first ones).
  num_orbit_views: int = 0
  # Optional quality score (NaN if none).
  quality: float = math.nan
  # Orbit elevation, exact or estimated (NaN if unknown).
  elevation_estimate: float = math.nan
  # [N, 3] float32 points on the true surface, in the cameras' world frame, uniform by
  # area (evaluation's geometry scores); None when the record has none.
  surface: np.ndarray | None = None

  @property
  def num_views(self) -> int:
    return len(self.images)


def encode_png(image: np.ndarray, compress_level: int = 3) -> bytes:
  """PNG bytes of ``[H, W, 4]`` or ``[H, W, 3]`` uint8 (or float in [0, 1])."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG", compress_level=compress_level)
  return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
  """``[H, W, 4]`` uint8 RGBA of PNG bytes (RGB gets alpha 255).

  Raises:
    BadRecordError: the bytes are not a readable image.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      if image.mode != "RGBA":
        image = image.convert("RGBA")
      return np.asarray(image)
  except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, ...
    raise BadRecordError(f"undecodable image: {error}") from error


def _bytes(values):
  return feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=list(values)))


def _floats(values):
  return feature_pb2.Feature(float_list=feature_pb2.FloatList(
      value=np.asarray(values, np.float32).reshape(-1)))


def serialize(record: MultiViewRecord) -> bytes:
  """The serialized ``tf.train.Example`` of a record."""
  views = record.num_views
  if record.source not in SOURCES:
    raise ValueError(f"source must be one of {SOURCES}, got {record.source!r}")
  shapes = {"c2w": (views, 4, 4), "intrinsics": (views, 4), "azimuth": (views,),
            "elevation": (views,)}
  for field, shape in shapes.items():
    if np.shape(getattr(record, field)) != shape:
      raise ValueError(f"{field} has shape {np.shape(getattr(record, field))}, want {shape}")
  features = {
      "id": _bytes([record.asset_id.encode()]),
      "caption": _bytes([record.caption.encode()]),
      "source": _bytes([record.source.encode()]),
      "quality": _floats([record.quality]),
      "elevation_estimate": _floats([record.elevation_estimate]),
      "num_orbit_views": feature_pb2.Feature(
          int64_list=feature_pb2.Int64List(value=[int(record.num_orbit_views)])),
      "views/rgba": _bytes(record.images),
      "views/c2w": _floats(record.c2w),
      "views/intrinsics": _floats(record.intrinsics),
      "views/azimuth": _floats(record.azimuth),
      "views/elevation": _floats(record.elevation),
  }
  if record.surface is not None:
    surface = np.asarray(record.surface, np.float32)
    if surface.ndim != 2 or surface.shape[1] != 3:
      raise ValueError(f"surface has shape {surface.shape}, want [N, 3]")
    features["surface/points"] = _floats(surface)
  # Deterministic: map entries in key order, so equal records are equal bytes.
  return example_pb2.Example(
      features=feature_pb2.Features(feature=features)).SerializeToString(deterministic=True)


def parse(serialized: bytes, min_views: int = 1) -> MultiViewRecord:
  """Parses and validates a serialized record; images stay encoded.

  Args:
    serialized: bytes of a ``tf.train.Example``.
    min_views: fewest views a usable record must have.

  Raises:
    BadRecordError: unparsable bytes, missing keys, inconsistent view counts,
      too few views, non-finite cameras or an unknown source.
  """
  try:
    example = example_pb2.Example.FromString(serialized)
  except Exception as error:  # google.protobuf.message.DecodeError and kin.
    raise BadRecordError(f"unparsable record: {error}") from error
  feature = example.features.feature
  missing = [key for key in _REQUIRED if key not in feature]
  if missing:
    raise BadRecordError(f"record lacks {missing}")
  try:
    images = list(feature["views/rgba"].bytes_list.value)
    views = len(images)
    floats = lambda key: np.asarray(feature[key].float_list.value, np.float32)
    c2w, intrinsics = floats("views/c2w"), floats("views/intrinsics")
    azimuth, elevation = floats("views/azimuth"), floats("views/elevation")
    if (c2w.size, intrinsics.size, azimuth.size, elevation.size) != (16 * views, 4 * views,
                                                                     views, views):
      raise BadRecordError(
          f"inconsistent view counts: {views} images, {c2w.size // 16} cameras, "
          f"{intrinsics.size // 4} intrinsics, {azimuth.size} azimuths")
    if views < min_views:
      raise BadRecordError(f"{views} views, need at least {min_views}")
    if not (np.all(np.isfinite(c2w)) and np.all(np.isfinite(intrinsics))):
      raise BadRecordError("non-finite camera")
    source = feature["source"].bytes_list.value[0].decode()
    if source not in SOURCES:
      raise BadRecordError(f"unknown source {source!r}")
    scalar = lambda key: (float(feature[key].float_list.value[0])
                          if key in feature and feature[key].float_list.value else math.nan)
    orbit = feature["num_orbit_views"].int64_list.value if "num_orbit_views" in feature else []
    surface = None
    if "surface/points" in feature:
      surface = floats("surface/points")
      if surface.size % 3 or not np.all(np.isfinite(surface)):
        raise BadRecordError(f"malformed surface points ({surface.size} floats)")
      surface = surface.reshape(-1, 3)
    return MultiViewRecord(
        asset_id=feature["id"].bytes_list.value[0].decode(),
        caption=feature["caption"].bytes_list.value[0].decode(),
        source=source, images=images, c2w=c2w.reshape(views, 4, 4),
        intrinsics=intrinsics.reshape(views, 4), azimuth=azimuth, elevation=elevation,
        num_orbit_views=int(orbit[0]) if orbit else 0,
        quality=scalar("quality"), elevation_estimate=scalar("elevation_estimate"),
        surface=surface)
  except BadRecordError:
    raise
  except (IndexError, UnicodeDecodeError) as error:
    raise BadRecordError(f"malformed record: {error!r}") from error


def tfds_features():
  """The ``tfds.features.FeaturesDict`` that describes the layout above."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  scalar = lambda dtype=np.float32: tfds.features.Scalar(dtype=dtype)
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "caption": tfds.features.Text(),
      "source": tfds.features.Text(),
      "quality": scalar(),
      "elevation_estimate": scalar(),
      "num_orbit_views": scalar(np.int64),
      "views": tfds.features.Sequence({
          "rgba": tfds.features.Image(shape=(None, None, 4)),
          "c2w": tfds.features.Tensor(shape=(4, 4), dtype=np.float32),
          "intrinsics": tfds.features.Tensor(shape=(4,), dtype=np.float32),
          "azimuth": scalar(),
          "elevation": scalar(),
      }),
  })
