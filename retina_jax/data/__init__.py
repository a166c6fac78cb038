"""Data sources, transforms, tokenisation and grain pipelines."""
