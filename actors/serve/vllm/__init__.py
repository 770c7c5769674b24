"""SPHINX-X as an out-of-tree vLLM model: config, processor, model, loader, plugin, engine."""
