"""Plain-torch references of the grouped expert GEMMs and the SwiGLU expert MLP
(``mm1_moe.kernels.grouped_gemm`` and ``mm1_moe.kernels.experts``): the oracle of their tests and
the baseline of their benchmarks. Autograd flows through every float input.

Shape legend: T tokens, D model width, F expert FFN width (F2 = 2F: [gate | up]), E experts,
K top-k, N = T*K routed rows (N_kept after capacity drops); I, O the input and output width of
one grouped GEMM (D -> 2F for fc1, F -> D for fc2).

Rows are expert-sorted: expert e owns rows ``offsets_E1[e]:offsets_E1[e+1]``. With
``gather_index_N`` the GEMM input is a token matrix and row n reads token ``gather_index_N[n]``;
``row_scale_N`` multiplies output row n (the routing weight).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint


def grouped_mm_reference(a: torch.Tensor, w_EIO: torch.Tensor, offsets_E1: torch.Tensor,
                         gather_index_N: Optional[torch.Tensor] = None,
                         row_scale_N: Optional[torch.Tensor] = None) -> torch.Tensor:
    """c_NO[n] = a[src(n)] @ w_EIO[e(n)] (* row_scale_N[n]); a is a_NI, or a_TI when
    ``gather_index_N`` gives src(n). A loop over experts with torch.matmul."""
    a_NI = a if gather_index_N is None else a[gather_index_N.long()]
    bounds = offsets_E1.tolist()
    parts = [a_NI[bounds[e]:bounds[e + 1]] @ w_EIO[e] for e in range(w_EIO.shape[0])]
    c_NO = torch.cat(parts, dim=0) if parts else a_NI.new_zeros(0, w_EIO.shape[2])
    if row_scale_N is not None:
        c_NO = c_NO * row_scale_N[:, None].to(c_NO.dtype)
    return c_NO


def swiglu_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2F] pre-activations [gate | up] -> [..., F]: silu(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_experts_reference(x: torch.Tensor, w1_EDF2: torch.Tensor, w2_EFD: torch.Tensor,
                             offsets_E1: torch.Tensor,
                             gather_index_N: Optional[torch.Tensor] = None,
                             row_scale_N: Optional[torch.Tensor] = None, *,
                             recompute_fc1: bool = False) -> torch.Tensor:
    """y_ND = (silu(x w1_gate) * (x w1_up)) @ w2 per expert (* row_scale_N); x is x_ND, or x_TD
    with ``gather_index_N``. w1_EDF2 holds [gate | up] along its last dim. ``recompute_fc1``
    (as the Triton op's) keeps no fc1 intermediates: fc1 and the SwiGLU rerun in the backward
    (torch.utils.checkpoint; h_NF is still saved, as fc2's input)."""
    def fc1_swiglu(x, w1_EDF2):
        return swiglu_reference(grouped_mm_reference(x, w1_EDF2, offsets_E1, gather_index_N))

    if recompute_fc1 and torch.is_grad_enabled():
        h_NF = torch.utils.checkpoint.checkpoint(fc1_swiglu, x, w1_EDF2, use_reentrant=False)
    else:
        h_NF = fc1_swiglu(x, w1_EDF2)
    return grouped_mm_reference(h_NF, w2_EFD, offsets_E1, row_scale_N=row_scale_N)


def sort_by_expert(ids_TK: torch.Tensor, num_experts: int
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stable counting-sort metadata of top-k ids: (sort_index_N int64: the flat slot t*K+k of
    each expert-sorted row, offsets_E1 int32). The plain-torch stand-in for the dispatch kernel."""
    sort_index_N = torch.argsort(ids_TK.reshape(-1), stable=True)
    counts_E = torch.bincount(ids_TK.reshape(-1), minlength=num_experts)
    offsets_E1 = torch.zeros(num_experts + 1, dtype=torch.int32, device=ids_TK.device)
    offsets_E1[1:] = torch.cumsum(counts_E, 0)
    return sort_index_N, offsets_E1


def mixtral_experts_reference(x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                              w1_EDF2: torch.Tensor, w2_EFD: torch.Tensor) -> torch.Tensor:
    """A Mixtral-style sparse MoE FFN given the router's choice: out_TD[t] = sum_k weights[t, k] *
    expert_{ids[t, k]}(x[t]), computed token by token per expert (HF's loop order), without any
    expert-sorted layout. A second, independent oracle for the sorted pipeline."""
    T, K = ids_TK.shape
    out_TD = torch.zeros_like(x_TD)
    for e in range(w1_EDF2.shape[0]):
        token_idx, k_idx = torch.where(ids_TK == e)
        if token_idx.numel() == 0:
            continue
        h = swiglu_reference(x_TD[token_idx] @ w1_EDF2[e])
        y = (h @ w2_EFD[e]) * weights_TK[token_idx, k_idx, None].to(x_TD.dtype)
        out_TD = out_TD.index_add(0, token_idx, y)
    return out_TD
