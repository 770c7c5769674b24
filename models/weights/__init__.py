"""Weights in and out: the model directory, streamed I/O and one adapter per foreign format."""
