"""mm1-moe: mixture-of-experts scaling library for MM1 multimodal LLMs on Megatron-core."""

from . import kernels as _kernels  # noqa: F401  first: it picks the Triton interpreter on CPU

__version__ = "0.1.0"
