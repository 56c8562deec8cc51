"""Process start-up: torch.distributed + Megatron parallel_state, device choice, seeding, and
the CPU compatibility layer for Megatron-core's CUDA-only calls."""

from .cpu_compat import apply_cpu_compat, needs_cpu_compat
from .distributed import Runtime, initialize, seed_everything, shutdown

__all__ = ["Runtime", "apply_cpu_compat", "initialize", "needs_cpu_compat", "seed_everything",
           "shutdown"]
