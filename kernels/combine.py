"""Token combine: the weighted sum of each token's K expert outputs, back in token order.

Shape legend: T tokens, D model width, E experts, K top-k, N = T*K routed rows (N_kept after
capacity drops).

Combine is the adjoint of dispatch, so it reuses dispatch's two row kernels (kernels/dispatch.py):
forward = ``dispatch_bwd`` with weights (one program per token block sums its K rows in fixed k
order: deterministic, no atomics); backward = ``dispatch_fwd`` with a per-row scale (grad_y) and
the fused dot product that gives grad_weights while grad_out is read once.
Layers: ``combine_fwd`` / ``combine_bwd`` -> ``CombineFunction`` -> ``combine``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._common import check_device
from .dispatch import Blocks, DispatchMeta, dispatch_bwd, dispatch_fwd


def combine_fwd(y_ND: torch.Tensor, weights_TK: Optional[torch.Tensor], meta: DispatchMeta,
                blocks: Blocks = None) -> torch.Tensor:
    """out_TD[t] = sum_k weights[t, k] * y_ND[inverse[t*K + k]] (dropped slots add 0; weights 1
    when None), accumulated in fp32 (fp64 for fp64 y), returned in y's dtype."""
    if weights_TK is not None:
        if weights_TK.shape != (meta.num_tokens, meta.top_k):
            raise ValueError(f"weights_TK must be [{meta.num_tokens}, {meta.top_k}], got "
                             f"{tuple(weights_TK.shape)}")
        check_device(y_ND, weights_TK)
    return dispatch_bwd(y_ND, meta, blocks, weights_TK=weights_TK)


def combine_bwd(grad_out_TD: torch.Tensor, y_ND: torch.Tensor,
                weights_TK: Optional[torch.Tensor], meta: DispatchMeta, blocks: Blocks = None,
                need_weights_grad: bool = True
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """grad_y[n] = weights[slot] * grad_out[slot // K] (slot = sort_index[n]) and, when weights
    are given and ``need_weights_grad``, grad_weights[t, k] = <grad_out[t], y[inverse[t*K+k]]>
    (0 for dropped slots), in the weights' dtype."""
    if weights_TK is None:
        return dispatch_fwd(grad_out_TD, meta, blocks), None
    w = weights_TK.contiguous()
    if not need_weights_grad:
        return dispatch_fwd(grad_out_TD, meta, blocks, scale_TK=w), None
    grad_y, grad_w = dispatch_fwd(grad_out_TD, meta, blocks, scale_TK=w, dot_ND=y_ND)
    return grad_y, grad_w.view(weights_TK.shape)


class CombineFunction(torch.autograd.Function):
    """(y_ND, weights_TK or None) -> out_TD."""

    @staticmethod
    def forward(ctx, y_ND: torch.Tensor, weights_TK: Optional[torch.Tensor], meta: DispatchMeta,
                blocks: Blocks = None):
        ctx.meta, ctx.blocks = meta, blocks
        # y is read back only for the weights' grad: an unweighted combine (the fused EP=1 path)
        # keeps no [N, D] copy alive until backward (64 MiB per layer at mm1-7b-moe, bf16)
        need_w = weights_TK is not None and ctx.needs_input_grad[1]
        ctx.save_for_backward(y_ND if need_w else None, weights_TK)
        return combine_fwd(y_ND, weights_TK, meta, blocks)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out_TD: torch.Tensor):
        y_ND, weights_TK = ctx.saved_tensors
        need_w = y_ND is not None
        grad_y, grad_w = combine_bwd(grad_out_TD, y_ND, weights_TK, ctx.meta, ctx.blocks,
                                     need_weights_grad=need_w)
        return (grad_y if ctx.needs_input_grad[0] else None), grad_w, None, None


def combine(y_ND: torch.Tensor, weights_TK: Optional[torch.Tensor], meta: DispatchMeta,
            blocks: Blocks = None) -> torch.Tensor:
    """Weighted sum of each token's expert outputs: [N_kept, D] -> [T, D],
    out[t] = sum_k weights[t, k] * y_ND[meta.inverse_TK[t*K + k]]; dropped slots contribute 0.
    ``weights_TK=None`` sums unweighted (routing weight already applied in the expert GEMM).
    Differentiable in ``y_ND`` and ``weights_TK``. ``blocks`` = (rows, columns) per program."""
    return CombineFunction.apply(y_ND, weights_TK, meta, blocks)
