"""Once-per-process set-up, and the one choice of kernels behind ``auto``.

``setup_process`` runs before a command does any work (the CLI, the benchmark harness and the
distributed test runners call it; ``initialize`` calls it too, so library users get it): it
keeps torch from compiling C++ on first use on CPU and quiets the warnings megatron.core prints
at import for what we leave out on purpose. It imports neither megatron nor triton, so a
command that needs neither pays nothing. The Megatron patches proper are applied when the
runtime starts (``initialize``), since they import Megatron's modules.

The Triton interpreter switch is not here: ``@triton.jit`` reads ``TRITON_INTERPRET`` when a
kernel module is imported, so it lives in the kernels package itself (``kernels/__init__.py``).
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from ..config.schema import AUTO_ON_CPU, AUTO_ON_GPU
from .megatron_patches import BY_NAME, apply_patch

_set_up = False

# kernels.<kind>: auto -> what runs (the two maps live with the config schema, which the
# torch-free memory planner reads too), decided once when the runtime starts (``initialize``).
_auto: Optional[Dict[str, str]] = None


def setup_process() -> None:
    """Idempotent process set-up (see the module docstring)."""
    global _set_up
    if _set_up:
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # no C++ compile on first use
    apply_patch(BY_NAME["import_warnings"])
    _set_up = True


def resolve_auto_kernels(on_gpu: bool) -> Dict[str, str]:
    """Fix what ``auto`` means for this process (called by ``initialize``). Returns the map."""
    global _auto
    _auto = dict(AUTO_ON_GPU if on_gpu else AUTO_ON_CPU)
    return dict(_auto)


def kernel_for(kind: str, name: str) -> str:
    """The kernels that run for ``kernels.<kind>`` = ``name``: ``name`` itself, or for ``auto``
    the choice made when the runtime started."""
    if name != "auto":
        return name
    if _auto is None:
        raise RuntimeError(f"kernels.{kind}=auto is decided when the runtime starts: call "
                           "mm1_moe.runtime.initialize before building a model, or name the "
                           f"kernels (e.g. kernels.{kind}={AUTO_ON_CPU[kind]})")
    return _auto[kind]
