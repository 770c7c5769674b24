"""sphinx-x actors layer."""
