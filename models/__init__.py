"""sphinx-x models layer."""
