"""Plain-torch reference of RMSNorm (``mm1_moe.kernels.rmsnorm``): the oracle of its tests and the
baseline of its benchmark.

Shape legend: D model width (the last dim; any leading shape).

Convention: Hugging Face's ``LlamaRMSNorm.forward`` (transformers 5.x, modeling_llama.py), step
for step: x.to(fp32); rstd = rsqrt(mean(x^2) + eps); normed = (x * rstd).to(x's dtype);
out = weight * normed. In bf16 that rounds twice (the normalized row, then the product).
``torch.nn.functional.rms_norm`` (torch 2.13, CPU, measured) multiplies by the weight in fp32
and rounds once, so for bf16 inputs the two differ by up to one bf16 ulp of the output (about
1 element in 4 at D=256); in fp32 they agree to rounding (~1e-7 relative). One difference from
HF on purpose: the output is in x's dtype, where HF's is the promotion of the weight's and x's
(an fp32 weight on bf16 x gives fp32 there); with equal dtypes, as in training, they agree.
Math in fp32, fp64 for fp64 inputs (gradcheck).
"""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] -> [..., D] in x's dtype; differentiable in both."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    x_acc = x.to(acc)
    normed = x_acc * torch.rsqrt(x_acc.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * normed.to(x.dtype)).to(x.dtype)
