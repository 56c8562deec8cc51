"""What every kernel file shares: the interpreter switch, block-size helpers, device limits.

Shape legend used across kernels/ (and mm1_moe/moe/):
  T tokens, D model width, F expert FFN width, E experts, e local experts, K top-k,
  N = T*K routed rows.
"""

from __future__ import annotations

import os

import torch
import triton

# The Triton interpreter (CPU runs, CI) computes bf16 arithmetic and bf16 tl.dot wrongly
# (silent garbage, measured with triton 3.9): kernels upcast after loading when this is set.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

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
