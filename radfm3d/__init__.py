"""radfm3d."""
