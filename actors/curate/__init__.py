"""Curation inside Ray workers: Set-of-Mark images and questions, OCR-intensive pages (pipelines.stages.curate)."""
