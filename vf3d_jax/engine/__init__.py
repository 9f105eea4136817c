"""Data engine: filtering generated orbit videos and annotating their camera elevation."""
