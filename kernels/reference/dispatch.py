"""Plain-torch references of kernels/dispatch.py and kernels/combine.py: routing metadata,
dispatch (token rows into expert order) and combine (weighted sum back into token order).

Shape legend: T tokens, D model width, E experts, K top-k, N = T*K routed rows (N_kept after
capacity drops).

Written to be obviously right rather than fast: torch.argsort(stable=True) for the sort and a
loop over experts for capacity, so it shares no trick with the kernels it checks. Differentiable
through torch autograd.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..dispatch import DispatchMeta


def dispatch_metadata_ref(ids_TK: torch.Tensor, num_experts: int,
                          capacity_factor: Optional[float] = None,
                          probs_TK: Optional[torch.Tensor] = None) -> DispatchMeta:
    """The routing metadata of ``dispatch_metadata``: a stable argsort by expert; with a
    capacity, each expert keeps its ``capacity`` highest-prob slots (ties: lower slot)."""
    T, K = ids_TK.shape
    ids_N = ids_TK.reshape(-1).long()
    keep_N = torch.ones_like(ids_N, dtype=torch.bool)
    capacity = None
    if capacity_factor is not None:  # per expert: keep the top-capacity (prob desc, slot asc)
        capacity = math.ceil((T * K / num_experts) * capacity_factor)  # Megatron get_capacity
        probs_N = probs_TK.detach().reshape(-1).tolist()
        for e in range(num_experts):
            slots = (ids_N == e).nonzero().squeeze(1).tolist()
            dropped = sorted(slots, key=lambda s: (-probs_N[s], s))[capacity:]
            keep_N[dropped] = False
    sort_index_N = torch.argsort(ids_N, stable=True)
    sort_index_N = sort_index_N[keep_N[sort_index_N]]
    inverse_N = torch.full_like(ids_N, -1)
    inverse_N[sort_index_N] = torch.arange(sort_index_N.numel(), device=ids_N.device)
    counts_E = torch.bincount(ids_N[keep_N], minlength=num_experts)
    offsets_E1 = torch.cat([counts_E.new_zeros(1), torch.cumsum(counts_E, 0)])
    i32 = dict(dtype=torch.int32, device=ids_TK.device)
    return DispatchMeta(ids_N[sort_index_N].to(**i32), sort_index_N.to(**i32),
                        inverse_N.to(**i32), offsets_E1.to(**i32), counts_E.to(**i32),
                        num_dropped=int((~keep_N).sum()), capacity=capacity, num_tokens=T,
                        top_k=K)


def dispatch_ref(x_TD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
    """x_ND[n] = x_TD[sort_index[n] // K]."""
    return x_TD[meta.sort_index_N.long() // meta.top_k]


def combine_ref(y_ND: torch.Tensor, weights_TK: Optional[torch.Tensor],
                meta: DispatchMeta) -> torch.Tensor:
    """out[t] = sum over k (in order) of weights[t, k] * y_ND[inverse[t*K + k]]; dropped slots
    add 0. Computes in y's dtype (run it on fp32 inputs for an fp32 reference)."""
    T, K = meta.num_tokens, meta.top_k
    if y_ND.shape[0] == 0:  # every slot dropped, or no row came to this rank's experts
        # stay on the autograd graph: under expert parallelism every rank must run the
        # backward all-to-alls, also one whose experts got no rows (else the others hang)
        out = y_ND.new_zeros(T, y_ND.shape[1]) + 0 * y_ND.sum()
        return out if weights_TK is None else out + 0 * weights_TK.sum().to(out.dtype)
    inverse_TK = meta.inverse_TK.long().view(T, K)
    out_TD = y_ND.new_zeros(T, y_ND.shape[1])
    for k in range(K):
        row_T = inverse_TK[:, k]
        kept_T = (row_T >= 0).to(y_ND.dtype)
        w_T = kept_T if weights_TK is None else weights_TK[:, k].to(y_ND.dtype) * kept_T
        out_TD = out_TD + w_T[:, None] * y_ND[row_T.clamp(min=0)]
    return out_TD
