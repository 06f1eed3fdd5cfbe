"""Texts read by both models: per-token divergence over whole texts, aligned across tokenizers."""
