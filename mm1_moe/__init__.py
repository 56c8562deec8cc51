"""mm1-moe: mixture-of-experts scaling library for MM1 multimodal LLMs on Megatron-core."""

__version__ = "0.1.0"
