"""Single-image reconstruction: input preparation and mesh extraction."""

from vf3d_jax.inference.mesh import (EmptyMeshError, GridStats, Mesh, density_grid,
                                     density_grid_coarse_to_fine, export_mesh, extract_mesh,
                                     field_query_fn, mesh_from_grid)
from vf3d_jax.inference.preprocess import (EmptyForegroundError, ImageLoadError, load_image,
                                           preprocess_image, register_matting,
                                           remove_background, to_rgba)
