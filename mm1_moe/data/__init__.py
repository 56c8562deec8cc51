"""Data: MM1's caption/interleaved/text sources, the 45/45/10 mixture, packing with images,
the loader (MM1DataLoader -> PackedBatch), and a generated text stream for runtime checks."""

from .batch import PackedBatch
from .loader import MM1DataLoader
from .spec import DataSpec, data_spec_from_config
from .synthetic import MarkovChain, SyntheticTextBatches

__all__ = ["DataSpec", "MM1DataLoader", "MarkovChain", "PackedBatch", "SyntheticTextBatches",
           "data_spec_from_config"]
