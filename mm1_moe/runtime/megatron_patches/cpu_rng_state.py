"""Megatron's CUDA RNG state get/set served by the CPU generator (``when: cpu``).

``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state`` index
``torch.cuda.default_generators``, which has no CPU equivalent the module proxy could serve; on
CPU the "device" generator of a process is the CPU generator (one default stream, named forks
for tensor-parallel regions, as Megatron's CUDA streams)."""

from __future__ import annotations

import importlib
from typing import Any, List

import torch

from .record import Patch, Revert, chain, missing_text, rebind

MODULE = "megatron.core.tensor_parallel.random"


def get_rng_state_on_cpu(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    """Replaces ``_get_cuda_rng_state``: the CPU generator's state."""
    return torch.get_rng_state()


def set_rng_state_on_cpu(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False):
    """Replaces ``_set_cuda_rng_state``: sets the CPU generator's state."""
    torch.set_rng_state(new_state)


REPLACEMENTS = {"_get_cuda_rng_state": get_rng_state_on_cpu,
                "_set_cuda_rng_state": set_rng_state_on_cpu}


def check() -> List[str]:
    return (missing_text(f"{MODULE}:_get_cuda_rng_state", "default_generators")
            + missing_text(f"{MODULE}:_set_cuda_rng_state", "default_generators"))


def apply() -> Revert:
    reverts = [rebind(f"{MODULE}:{name}", fn) for name, fn in REPLACEMENTS.items()]
    return chain(reverts)


def probe() -> None:
    random = importlib.import_module(MODULE)
    state = random._get_cuda_rng_state()
    first = torch.rand(2)
    random._set_cuda_rng_state(state)
    assert torch.equal(first, torch.rand(2))


PATCH = Patch(
    name="cpu_rng_state",
    targets=tuple(f"{MODULE}:{name}" for name in REPLACEMENTS),
    when="cpu",
    why="_get/_set_cuda_rng_state index torch.cuda.default_generators (no CPU equivalent); "
        "the tensor-parallel RNG tracker must fork and restore the CPU generator instead.",
    check=check,
    apply=apply,
    probe=probe,
)
