"""Data: tokenizers, text sources, packing and grain pipelines."""
