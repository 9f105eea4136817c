"""Reading and converting model weights."""
