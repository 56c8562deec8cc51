"""``Tensor.type()`` names CPU float tensors as CUDA types while Megatron builds an optimizer
(``when: cpu``). THE ONE PROCESS-GLOBAL ENTRY in this registry.

Megatron's optimizers sort parameters by ``param.type() == 'torch.cuda.FloatTensor'`` (and
the bf16/fp16 names) and reject anything else; ``type()`` is a tensor method, out of reach of
the module proxy. The methods in ``TYPE_CHECK_SITES`` are wrapped so that, while one runs,
``torch.Tensor.type`` (no argument) answers the CUDA name for CPU float tensors.

Threading caveat: the swap is on the ``torch.Tensor`` class, so while an optimizer is being
built EVERY thread of the process sees CUDA names from ``Tensor.type()``. That window is the
optimizer constructor, on the main thread, before training starts; our own code never calls
``Tensor.type()`` without an argument. Do not build optimizers from several threads at once.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import List

import torch

from .record import Patch, Revert, chain, missing_text, rebind, resolve

_CUDA_TYPE_NAMES = {torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
                    torch.bfloat16: "torch.cuda.BFloat16Tensor"}

# module:Class.method: optimizer code paths that call ``param.type()`` for a CUDA name.
TYPE_CHECK_SITES = (
    "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer."
    "_build_model_and_main_param_groups",
    "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer.__init__",
    "megatron.core.optimizer.optimizer:Float16OptimizerWithFloat16Params.__init__",
)


@contextlib.contextmanager
def tensor_type_reports_cuda():
    """While active, ``Tensor.type()`` (no argument) names CPU float tensors as CUDA types."""
    original = torch.Tensor.type

    def cuda_named(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu" and \
                self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = cuda_named
    try:
        yield
    finally:
        torch.Tensor.type = original


def _wrapped(raw):
    func = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw

    def wrapped(*args, **kwargs):
        with tensor_type_reports_cuda():
            return func(*args, **kwargs)

    wrapped.__wrapped__ = func
    wrapped.__name__, wrapped.__qualname__ = func.__name__, func.__qualname__
    if isinstance(raw, staticmethod):
        return staticmethod(wrapped)
    if isinstance(raw, classmethod):
        return classmethod(wrapped)
    return wrapped


def check() -> List[str]:
    # __init__ of the distributed optimizer reaches the check through the method above it; the
    # other two name the CUDA type in their own body.
    return (missing_text(TYPE_CHECK_SITES[0], "'torch.cuda.FloatTensor'")
            + missing_text(TYPE_CHECK_SITES[1], "_build_model_and_main_param_groups")
            + missing_text(TYPE_CHECK_SITES[2], "'torch.cuda.FloatTensor'"))


def apply() -> Revert:
    return chain([rebind(site, _wrapped(resolve(site)[2])) for site in TYPE_CHECK_SITES])


def probe() -> None:
    assert torch.zeros(1).type() == "torch.FloatTensor"
    with tensor_type_reports_cuda():
        assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
        assert torch.zeros(1, dtype=torch.int64).type() == "torch.LongTensor"
    assert torch.zeros(1).type() == "torch.FloatTensor"
    module, _, path = TYPE_CHECK_SITES[2].partition(":")
    init = getattr(importlib.import_module(module), path.split(".")[0]).__init__
    assert hasattr(init, "__wrapped__")


PATCH = Patch(
    name="cpu_tensor_type",
    targets=TYPE_CHECK_SITES,
    when="cpu",
    why="Megatron's optimizers accept only parameters whose param.type() is a torch.cuda.* "
        "name; CPU parameters are refused. Process-global while an optimizer is built (see the "
        "module docstring for the threading caveat).",
    check=check,
    apply=apply,
    probe=probe,
)
