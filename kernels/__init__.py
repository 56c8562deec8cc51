"""Triton kernels of mm1-moe, installed as ``mm1_moe.kernels`` (see setup.py's package_dir).

One op per file, each with its plain-torch reference in ``reference/``. Modules under
``mm1_moe/`` never import ``triton`` directly: they call these files' plain functions, e.g.
``from mm1_moe.kernels.router import router``. (Nothing is re-exported here: a function named
like its module, ``router``/``dispatch``/``combine``, would shadow the module.)

  _common.py       kernel policy: interpreter-or-GPU switch, accumulate dtype, block helpers
  attention.py     flash attention: causal/bidirectional, GQA, packed documents (+ _bwd)
  attention_tiles.py  what the attention forward and backward kernels share (jit helpers)
  router.py        logits -> top-k ids/weights, expert counts, load-balance and z-loss terms
  dispatch.py      stable counting sort of routed slots by expert, row gather (DispatchMeta)
  combine.py       weighted sum of each token's K expert rows (the inverse of dispatch)
  grouped_gemm.py  grouped GEMM over expert-sorted rows (gather on input, scale on output)
  experts.py       the fused SwiGLU expert MLP on grouped GEMMs, forward and backward
  rmsnorm.py       fused RMSNorm forward and backward (fp32 statistics, no atomics)
  compile_check.py compile a kernel for sm90/sm80 without a GPU (shared memory, lowering)
  report.py        every launch of a config's layers compiled for sm90/sm80: registers, spills
  tile_candidates.py  each op's GPU tile candidates and a runner per op (report, tile sweep)
"""

import os

import torch

# The one place the project turns the interpreter on (_common.py reads the variable). It must
# run before triton is first imported: @triton.jit reads it when it decorates, and triton's own
# triton.language helpers (tl.cdiv, ...) are decorated at that import; Megatron imports triton
# too, which is why mm1_moe/__init__.py imports this package before anything else.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
