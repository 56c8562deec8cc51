"""Process start-up: torch.distributed + Megatron parallel_state, device choice, seeding, the
registry of Megatron-core workarounds, and the once-per-process set-up."""

from .distributed import Runtime, initialize, needs_cpu_runtime, seed_everything, shutdown
from .process import kernel_for, setup_process

__all__ = ["Runtime", "initialize", "kernel_for", "needs_cpu_runtime", "seed_everything",
           "setup_process", "shutdown"]
