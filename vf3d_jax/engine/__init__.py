"""The data engine: features and filters of generated orbit videos."""
