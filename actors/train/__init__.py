"""Training-side worker code: the Ray Train loop, its data reader, DeepSpeed config and weights."""
