"""RMSNorm as a Megatron-core spec module, on our fused Triton kernel (``mm1_moe.kernels.rmsnorm``)
or on ``torch.nn.functional.rms_norm``.

Shape legend: D model width (``hidden_size``); inputs are [..., D] (Megatron's [S, B, D]).

The constructor takes what Megatron's ``build_module`` passes a norm in a layer spec (as for
``WrappedTorchNorm``): ``(config, hidden_size, eps)``; the other keywords keep their names. Like
``WrappedTorchNorm`` and ``TENorm``, what to normalize is read from ``config.normalization``:
transformer_layer.py never passes ``normalization``, so a "LayerNorm" default there would refuse
every RMSNorm spec; an explicit ``normalization`` must agree.

Rounding in bf16: "triton" follows Hugging Face's LlamaRMSNorm (the normalized row rounded to
the input dtype before the weight multiply); "torch" rounds once (kernels/reference/rmsnorm.py):
the two differ by at most one bf16 ulp of the output. In fp32 they agree to ~1e-7.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

from ..kernels.rmsnorm import rms_norm
from .param_init import ONES, ParamInit

Kernel = Literal["triton", "torch"]
KERNELS = ("triton", "torch")


class RMSNorm(torch.nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps) over the last dim; weight [D] in
    ``config.params_dtype``, initialised to ones.

    Under sequence parallelism each tensor-parallel rank normalizes its own slice of the sequence,
    so the weight's gradient is partial per rank: the weight carries Megatron's
    ``sequence_parallel`` attribute (= ``config.sequence_parallel``), which makes
    ``finalize_model_grads`` all-reduce it over the TP group, as Megatron's own norms do."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5,
                 persist_layer_norm: bool = False, zero_centered_gamma: bool = False,
                 normalization: Optional[str] = None, *, kernel: Kernel = "triton"):
        super().__init__()
        del persist_layer_norm  # picks Apex's persistent LayerNorm kernel: nothing to pick here
        asked = normalization or config.normalization
        if config.normalization != "RMSNorm" or asked != "RMSNorm":
            raise ValueError(f"RMSNorm module built with normalization={asked!r} "
                             f"(config.normalization={config.normalization!r}): only 'RMSNorm'")
        if zero_centered_gamma or getattr(config, "layernorm_zero_centered_gamma", False):
            raise ValueError("RMSNorm does not support zero_centered_gamma (weight stored as w - 1)"
                             ": set config.layernorm_zero_centered_gamma=False")
        if kernel not in KERNELS:
            raise ValueError(f"RMSNorm kernel must be one of {KERNELS}, got {kernel!r}")
        self.hidden_size, self.eps, self.kernel = int(hidden_size), float(eps), kernel
        self.weight = torch.nn.Parameter(torch.empty(self.hidden_size, dtype=config.params_dtype))
        self.param_init("weight").init_(self.weight)
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def param_init(self, name: str) -> ParamInit:
        """How the weight is initialised, for mm1_moe.models.param_init (a norm's own rule)."""
        return {"weight": ONES}[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "triton":
            return rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, kernel={self.kernel}"
