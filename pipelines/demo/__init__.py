"""`sphinx-x demo`: the synthetic dataset, the end-to-end run and its parity check."""
