"""The multi-view video model: orbit videos from a prompt and/or a first frame."""
