"""Training loops and their building blocks (optimisers, sharding, checkpoints, logging)."""
