"""Flax models of vf3d_jax."""
