"""Triton kernels of mm1-moe, installed as ``mm1_moe.kernels`` (see setup.py's package_dir).

One op per file, each with its plain-torch reference in ``reference/``. Modules under
``mm1_moe/`` never import ``triton`` directly: they call these files' plain functions, e.g.
``from mm1_moe.kernels.router import router``. (Nothing is re-exported here: a function named
like its module, ``router``/``dispatch``/``combine``, would shadow the module.)

  attention.py     flash attention: causal/bidirectional, GQA, packed documents (+ _bwd)
  router.py        logits -> top-k ids/weights, expert counts, load-balance and z-loss terms
  dispatch.py      stable counting sort of routed slots by expert, row gather (DispatchMeta)
  combine.py       weighted sum of each token's K expert rows (the inverse of dispatch)
  grouped_gemm.py  grouped GEMM over expert-sorted rows (gather on input, scale on output)
  experts.py       the fused SwiGLU expert MLP on grouped GEMMs, forward and backward
  compile_check.py compile a kernel for sm90/sm80 without a GPU (shared memory, lowering)
"""

import os

import torch

if not torch.cuda.is_available():  # before any kernel module: @triton.jit reads it at import
    os.environ.setdefault("TRITON_INTERPRET", "1")
