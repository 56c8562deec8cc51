"""Data sources, packing and loaders. So far: the generated text stream for runtime checks."""

from .synthetic import MarkovChain, SyntheticTextBatches

__all__ = ["MarkovChain", "SyntheticTextBatches"]
