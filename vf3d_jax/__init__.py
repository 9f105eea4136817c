"""vf3d_jax: VFusion3D in JAX/Flax."""

__version__ = "0.1.0"
