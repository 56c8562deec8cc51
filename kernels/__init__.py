"""Triton kernels of mm1-moe, installed as ``mm1_moe.kernels`` (see setup.py's package_dir).

One op per file, each with its plain-torch reference in ``reference/``. Modules under
``mm1_moe/`` never import ``triton`` directly: they call the functions exported here.

  router.py        logits -> top-k ids/weights, expert counts, load-balance and z-loss terms
  dispatch.py      stable counting sort of routed slots by expert, row gather (DispatchMeta)
  combine.py       weighted sum of each token's K expert rows (the inverse of dispatch)
  grouped_gemm.py  grouped GEMM over expert-sorted rows (gather on input, scale on output)
  experts.py       the fused SwiGLU expert MLP on grouped GEMMs, forward and backward
  compile_check.py compile a kernel for sm90/sm80 without a GPU (shared memory, lowering)
"""

from .combine import combine
from .dispatch import DispatchMeta, dispatch, dispatch_metadata, expert_capacity
from .experts import swiglu_experts
from .grouped_gemm import grouped_mm
from .router import RouterOutput, router

__all__ = ["DispatchMeta", "RouterOutput", "combine", "dispatch", "dispatch_metadata",
           "expert_capacity", "grouped_mm", "router", "swiglu_experts"]
