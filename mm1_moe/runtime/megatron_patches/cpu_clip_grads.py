"""Gradient clipping that accepts CPU gradients (``when: cpu``).

``optimizer.clip_grads.clip_grad_by_total_norm_fp32`` asserts
``param.grad.type() == 'torch.cuda.FloatTensor'``, a tensor method the module proxy cannot
reach. The replacement does the same arithmetic: fp32/bf16 grads scaled by
max_norm / (norm + 1e-6) when that is below 1. ``optimizer.optimizer`` imported the function by
name, so it is rebound there too."""

from __future__ import annotations

import importlib
from typing import List

import torch

from .record import Patch, Revert, chain, missing_text, rebind

SITES = ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer")
NAME = "clip_grad_by_total_norm_fp32"


def clip_grad_by_total_norm_on_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Scale the grads of ``parameters`` so their total norm is at most ``max_norm``."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr, None) for p in parameters]
    grads = [g.detach() for g in grads if g is not None]
    for grad in grads:
        if grad.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"gradient clipping expects fp32/bf16 grads, got {grad.dtype}")
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0:
        torch._foreach_mul_(grads, clip_coeff)


def check() -> List[str]:
    problems = missing_text(f"{SITES[0]}:{NAME}", "param.grad.type() == 'torch.cuda.FloatTensor'")
    problems += missing_text(SITES[1], "from .clip_grads import")
    return problems


def apply() -> Revert:
    reverts = [rebind(f"{site}:{NAME}", clip_grad_by_total_norm_on_cpu) for site in SITES]
    return chain(reverts)


def probe() -> None:
    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = torch.full((4,), 1.0)  # norm 2
    for site in SITES:
        getattr(importlib.import_module(site), NAME)([param], 1.0, 2.0)
    assert torch.allclose(param.grad, torch.full((4,), 0.25), atol=1e-6)


PATCH = Patch(
    name="cpu_clip_grads",
    targets=tuple(f"{site}:{NAME}" for site in SITES),
    when="cpu",
    why="clip_grad_by_total_norm_fp32 asserts param.grad.type() == 'torch.cuda.FloatTensor' and "
        "so rejects every CPU gradient.",
    check=check,
    apply=apply,
    probe=probe,
)
