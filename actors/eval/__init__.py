"""Evaluation worker code: benchmark files, prompts, metrics and the scorer (pure Python), and the
answer engines that run a model over the prompts."""
