"""Cameras, rays and volume rendering of triplanes."""
