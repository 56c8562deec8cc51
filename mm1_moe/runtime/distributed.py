"""Process start-up: torch.distributed, Megatron ``parallel_state`` (TP/PP/EP/DP), device, seeds.

Works under ``torchrun`` (single or multi node: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT come from the environment) and as a plain single process (a one-rank group whose
rendezvous is an in-memory store: no port to pick, so no race with other processes for one).
GPUs: NCCL, one device per local rank. CPU: gloo, plus the registry's ``cpu`` entries
(``megatron_patches/``), which serve Megatron's CUDA-only calls on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict

import torch
import torch.distributed as dist

from ..config import Config, ConfigError, validate_layout
from .megatron_patches import apply_megatron_patches
from .process import resolve_auto_kernels, setup_process


@dataclass(frozen=True)
class Runtime:
    """What a started process knows about itself and its groups."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    data_parallel_size: int
    cpu_compat: bool
    """True without a GPU: Megatron runs on the CPU through the registry's ``cpu`` entries."""
    kernels: Dict[str, str]
    """What ``kernels.<kind>: auto`` runs in this process (decided once, here)."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def initialize(config: Config, timeout_minutes: int = 30) -> Runtime:
    """Start torch.distributed and Megatron's model-parallel groups for ``config``.

    Raises ConfigError when the layout does not fit the world size.
    """
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    dp = validate_layout(config, world)
    on_gpu = not needs_cpu_runtime()
    setup_process()
    apply_megatron_patches(on_cpu=not on_gpu)
    kernels = resolve_auto_kernels(on_gpu)
    if on_gpu:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device, backend = torch.device("cuda", torch.cuda.current_device()), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        from datetime import timedelta

        # One process started by hand: picking a "free" port and binding it later raced with
        # other processes on the machine (EADDRINUSE seen in the test suite).
        store = dist.HashStore() if world == 1 and "MASTER_ADDR" not in os.environ else None
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=timedelta(minutes=timeout_minutes))
    _initialize_model_parallel(config)
    seed_everything(config.train.seed)
    return Runtime(rank, world, local_rank, device, backend, dp, not on_gpu, kernels)


def needs_cpu_runtime() -> bool:
    """True when no GPU is usable, so Megatron's CUDA calls must be served by the CPU."""
    return not torch.cuda.is_available()


def _initialize_model_parallel(config: Config) -> None:
    from megatron.core import parallel_state

    par = config.parallel
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor_parallel,
        pipeline_model_parallel_size=par.pipeline_parallel,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline,
        expert_model_parallel_size=par.expert_parallel,
        expert_tensor_parallel_size=par.expert_tensor_parallel,
    )


def seed_everything(seed: int) -> None:
    """Seed the default generators and Megatron's tensor-parallel RNG streams (data-parallel
    ranks share the seed, tensor-parallel ranks get distinct model-parallel streams)."""
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    """Tear down Megatron's groups and the process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
