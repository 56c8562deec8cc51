"""Megatron's aux-loss scale accepts a scale of another shape (``when: always``).

``MoEAuxLossAutoScaler.backward`` creates the process-global ``main_loss_backward_scale`` as a
0-d tensor when none was set; ``set_loss_scale`` (called by the pipeline schedules with a [1]
tensor) then ``copy_``-s into it and fails on the shape. In one process that happens as soon as
a Megatron MoELayer (the parity tests' reference) ran a backward before a training step: every
later Trainer failed its first step. Our MoE layer scales its aux loss itself
(``MoELayer.aux_loss_scale``); the global only has to accept the schedules' value. The
replacement stores the new scale when the shapes differ, and copies as upstream otherwise."""

from __future__ import annotations

import importlib
from typing import List

import torch

from .record import Patch, Revert, missing_text, rebind

TARGET = "megatron.core.transformer.moe.moe_utils:MoEAuxLossAutoScaler.set_loss_scale"
_MODULE, _, _PATH = TARGET.partition(":")


def _scaler():
    return getattr(importlib.import_module(_MODULE), _PATH.split(".")[0])


def set_loss_scale(scale: torch.Tensor) -> None:
    """Upstream's ``set_loss_scale`` that also takes a scale of a new shape."""
    scaler = _scaler()
    current = scaler.main_loss_backward_scale
    if current is None or current.shape != scale.shape:
        scaler.main_loss_backward_scale = scale
    else:
        current.copy_(scale)


def check() -> List[str]:
    return (missing_text(TARGET, ".copy_(scale)")
            + missing_text(f"{_MODULE}:MoEAuxLossAutoScaler.backward", "torch.tensor("))


def apply() -> Revert:
    return rebind(TARGET, staticmethod(set_loss_scale))


def probe() -> None:
    scaler = _scaler()
    previous = scaler.main_loss_backward_scale
    try:
        scaler.main_loss_backward_scale = torch.tensor(1.0)  # what backward leaves behind
        scaler.set_loss_scale(torch.full((1,), 0.5))
        assert scaler.main_loss_backward_scale.tolist() == [0.5]
    finally:
        scaler.main_loss_backward_scale = previous


PATCH = Patch(
    name="aux_loss_scale",
    targets=(TARGET,),
    when="always",
    why="MoEAuxLossAutoScaler.set_loss_scale copy_-s a [1] scale into the 0-d tensor its "
        "backward created: a process that ran Megatron's MoE backward fails every later step.",
    check=check,
    apply=apply,
    probe=probe,
)
