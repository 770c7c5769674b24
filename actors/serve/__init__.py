"""Serving-side worker code: the OpenAI ingress, the replicas and their image policy."""
