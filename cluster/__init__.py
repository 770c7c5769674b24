"""sphinx-x cluster layer."""
