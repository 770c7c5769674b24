"""Preprocess-side worker code: source rows, the tiler actors, deterministic shards."""
