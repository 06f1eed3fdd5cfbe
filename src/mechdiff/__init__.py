"""mechdiff: fair, causal diffing of a base language model against its fine-tunes."""
__version__ = "0.1.0"
