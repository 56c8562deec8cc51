"""Kernel policy, written once for every kernel file: who runs the kernels (the Triton
interpreter or a GPU) and what follows from it, the accumulation dtype, block-size helpers,
device limits. A GPU tuning pass changes these rules here, not per op; each op keeps its own GPU
block table next to its kernel.

Shape legend used across kernels/ (and mm1_moe/moe/):
  T tokens, D model width, F expert FFN width, E experts, e local experts, K top-k,
  N = T*K routed rows.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Whether the Triton interpreter runs the kernels. kernels/__init__.py sets TRITON_INTERPRET when
# no GPU is present (before any kernel module: @triton.jit reads it at decoration); it is read
# here, once, and every launcher asks the functions below rather than the variable.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_interpreter_tiles() -> bool:
    """Whether launchers take interpreter tiles (few, large programs: the interpreter runs each tl
    op as one numpy call over a whole tile, and pays per program) instead of their GPU table.

    Decided by who runs the kernel (TRITON_INTERPRET), not by where the tensors live: the two
    tests disagree only on an interpreted run over CUDA tensors, which the interpreter executes
    on the host program by program, so interpreter tiles are right there too (GPU tiles would be
    correct but slow); CPU tensors without the interpreter never launch (``check_device``). It
    is also the flag the UPCAST rule below reads, so one switch decides both."""
    return INTERPRET


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """What kernels accumulate in (and write their fp statistics in, e.g. attention's lse) for
    inputs of ``dtype``: fp64 for fp64 inputs (the gradcheck tests), fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_TL_FLOAT = {torch.float32: tl.float32, torch.float64: tl.float64}


class KernelDtypes(NamedTuple):
    """The numeric constexprs of a kernel launch for inputs of one dtype."""

    acc: tl.dtype
    """ACC_DTYPE: ``acc_dtype`` as a Triton dtype."""
    upcast: bool
    """UPCAST: convert every tile to ``acc`` right after loading. True under the interpreter,
    which computes bf16 arithmetic and bf16 tl.dot wrongly (silent garbage, measured with triton
    3.9); False on a GPU, where the dots take bf16 and accumulate in fp32."""
    precision: str
    """PRECISION (tl.dot's input_precision): "ieee" for fp32/fp64 inputs, so fp32 tests on a GPU
    do not silently drop to TF32 (torch's default matmul precision is IEEE too); bf16/fp16 dots
    ignore it."""


def kernel_dtypes(dtype: torch.dtype) -> KernelDtypes:
    """The ACC_DTYPE, UPCAST and PRECISION constexprs for inputs of ``dtype``."""
    precision = "ieee" if dtype in (torch.float32, torch.float64) else "tf32"
    return KernelDtypes(_TL_FLOAT[acc_dtype(dtype)], INTERPRET, precision)


# Shared memory a kernel may use per block (bytes): the opt-in maxima of the cards we target.
SHARED_MEMORY_LIMIT = {90: 232448, 80: 166912}


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def check_device(*tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, and that device usable by Triton here (CUDA, or CPU under the
    interpreter). Returns the device."""
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"tensors on different devices: {t.device} and {device}")
    if device.type == "cpu" and not INTERPRET:
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before "
                           "mm1_moe.kernels is imported")
    return device
