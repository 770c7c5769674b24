"""sphinx-x pipelines layer."""
