"""The pipeline stages (preprocess, train, serve, ...), one module each."""
