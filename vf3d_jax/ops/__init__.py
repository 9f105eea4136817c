"""Numerical building blocks shared across vf3d_jax."""
