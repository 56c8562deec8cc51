"""Token dispatch: routing metadata (a stable counting sort by expert) and the row gather that
permutes tokens into expert order, with its backward.

Shape legend: T tokens, D model width, E experts, K top-k, N = T*K routed rows (N_kept after
capacity drops), B blocks of routed rows (metadata kernels only).

Layers: ``_route_*_kernel`` -> ``dispatch_metadata``; ``_dispatch_fwd_kernel`` /
``_dispatch_bwd_kernel`` -> ``dispatch_fwd`` / ``dispatch_bwd`` -> ``DispatchFunction`` ->
``dispatch``. Combine (kernels/combine.py) is the adjoint of dispatch and reuses both row
kernels: its forward is ``dispatch_bwd`` with weights, its backward ``dispatch_fwd`` with a
per-row scale and a fused dot product for the weight gradient.

Caution: tested in the Triton interpreter (fp32, fp64) and compiled for sm90/sm80 without a GPU
(tests/kernels/test_dispatch.py); the GPU block sizes below are not yet measured on a card.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from ._common import check_device, kernel_dtypes, next_pow2, use_interpreter_tiles

# (rows per program, columns per program) of the row kernels; None picks the defaults below.
Blocks = Optional[Tuple[int, int]]


@dataclass(frozen=True, eq=False)  # eq on tensor fields would be ambiguous
class DispatchMeta:
    """Where each routed row goes; made by ``dispatch_metadata``, consumed by ``dispatch`` and
    ``combine``. A flat slot is ``s = t*K + k`` (token t's k-th choice); rows are sorted by
    expert and, within an expert, by ascending slot (a stable sort).

    sorted_expert_ids_N: int32 [N_kept], the expert of each sorted row.
    sort_index_N: int32 [N_kept], the flat slot each sorted row came from (token = slot // K).
    inverse_TK: int32 [T*K], the sorted row of each flat slot; -1 where capacity dropped it.
    offsets_E1: int32 [E+1], expert e owns rows offsets[e]..offsets[e+1]; offsets[0] = 0.
    counts_E: int32 [E], kept rows per expert.
    num_dropped: python int, slots dropped by capacity (the capacity path syncs anyway to size
        the kept rows; the dropless path never syncs and reports 0).
    capacity: rows an expert may keep, or None (dropless).
    """

    sorted_expert_ids_N: torch.Tensor
    sort_index_N: torch.Tensor
    inverse_TK: torch.Tensor
    offsets_E1: torch.Tensor
    counts_E: torch.Tensor
    num_dropped: int
    capacity: Optional[int]
    num_tokens: int
    top_k: int

    @property
    def num_experts(self) -> int:
        return self.counts_E.numel()

    @property
    def num_rows(self) -> int:
        """N_kept: rows in expert order (T*K without capacity)."""
        return self.sort_index_N.numel()


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """Rows one expert may keep: ceil(capacity_factor * T * K / E), evaluated in the order of
    Megatron-core's ``moe_utils.get_capacity`` ((T*K / E) * factor) so float rounding agrees."""
    return math.ceil((num_tokens * top_k / num_experts) * capacity_factor)


# ----------------------------------------------------------------------------------------------
# Routing metadata: a three-kernel counting sort. (1) each block of BLOCK_N slots counts its rows
# per expert; (2) one program turns the [B, E] counts into offsets_E1 and, for each (block,
# expert), the first output row of that block's rows of that expert; (3) each block writes a row
# to that start + its rank among the block's earlier rows of the same expert (a cumsum over a
# [BLOCK_N, E] one-hot). Every row's place is computed, not raced for: deterministic and
# stable, no atomics. (A tl.sort of (expert, slot) keys would avoid the one-hot, but the
# interpreter runs tl.sort element by element: 17 s for 4096 slots, measured.)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _route_count_kernel(ids_N, counts_BE, N, E, BLOCK_N: tl.constexpr, E_PAD: tl.constexpr):
    pid = tl.program_id(0)
    slots = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = slots < N
    e = tl.load(ids_N + slots, mask=in_range, other=0).to(tl.int32)
    tl.device_assert((e >= 0) & (e < E), "expert id out of range")
    counts = tl.histogram(e, E_PAD, mask=in_range)
    experts = tl.arange(0, E_PAD)
    tl.store(counts_BE + pid * E + experts, counts, mask=experts < E)


@triton.jit
def _route_prefix_kernel(counts_BE, start_BE, counts_E, offsets_E1, B, E,
                         BLOCK_B: tl.constexpr, E_PAD: tl.constexpr):
    experts = tl.arange(0, E_PAD)
    e_mask = experts < E
    blocks = tl.arange(0, BLOCK_B)
    # Pass 1: rows per expert -> offsets_E1 (offsets_E1[0] is pre-zeroed by the launcher).
    total_E = tl.zeros([E_PAD], dtype=tl.int32)
    for b0 in range(0, B, BLOCK_B):
        mask = ((b0 + blocks) < B)[:, None] & e_mask[None, :]
        c = tl.load(counts_BE + (b0 + blocks)[:, None] * E + experts[None, :], mask=mask, other=0)
        total_E += tl.sum(c, axis=0)
    tl.store(counts_E + experts, total_E, mask=e_mask)
    tl.store(offsets_E1 + 1 + experts, tl.cumsum(total_E, axis=0), mask=e_mask)
    # Pass 2: block b's rows of expert e start at offsets[e] + (rows of e in blocks < b).
    running_E = tl.cumsum(total_E, axis=0) - total_E
    for b0 in range(0, B, BLOCK_B):
        mask = ((b0 + blocks) < B)[:, None] & e_mask[None, :]
        idx = (b0 + blocks)[:, None] * E + experts[None, :]
        c = tl.load(counts_BE + idx, mask=mask, other=0)
        tl.store(start_BE + idx, running_E[None, :] + tl.cumsum(c, axis=0) - c, mask=mask)
        running_E += tl.sum(c, axis=0)


@triton.jit
def _route_scatter_kernel(ids_N, start_BE, sort_index_N, sorted_expert_ids_N, inverse_N, N, E,
                          BLOCK_N: tl.constexpr, E_PAD: tl.constexpr):
    pid = tl.program_id(0)
    slot = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = slot < N
    e = tl.load(ids_N + slot, mask=in_range, other=0).to(tl.int32)
    one_hot = (e[:, None] == tl.arange(0, E_PAD)[None, :]).to(tl.int32)
    # rank = earlier rows of this block with the same expert (slot order: the sort is stable)
    rank = tl.sum(tl.cumsum(one_hot, axis=0) * one_hot, axis=1) - 1
    row = tl.load(start_BE + pid * E + e, mask=in_range, other=0) + rank
    tl.store(sort_index_N + row, slot, mask=in_range)
    tl.store(sorted_expert_ids_N + row, e, mask=in_range)
    tl.store(inverse_N + slot, row, mask=in_range)


def route_blocks(n: int, e_pad: int, interpret: Optional[bool] = None) -> Tuple[int, int]:
    """(BLOCK_N, BLOCK_B) of the metadata kernels for n slots and E padded to e_pad; ``interpret``
    overrides ``use_interpreter_tiles()`` (tests build the GPU tiles with False)."""
    if interpret is None:
        interpret = use_interpreter_tiles()
    if interpret:  # few, large programs: the interpreter pays per program
        block_n = max(1, min(next_pow2(n), (1 << 20) // e_pad))
        return block_n, next_pow2(triton.cdiv(n, block_n))
    # GPU: [BLOCK_N, E_PAD] one-hot and [BLOCK_B, E_PAD] prefix tiles of 8K int32 entries
    # (64 registers per thread at 4 warps). E=64, T*K=32K: 256 blocks, a 16K-entry count table
    # that the single prefix program reads twice. Not yet timed on a card.
    block_n = max(16, min(1024, 8192 // e_pad))
    return block_n, max(1, min(next_pow2(triton.cdiv(n, block_n)), 8192 // e_pad))


def dispatch_metadata(ids_TK: torch.Tensor, num_experts: int,
                      capacity_factor: Optional[float] = None,
                      probs_TK: Optional[torch.Tensor] = None,
                      blocks: Blocks = None) -> DispatchMeta:
    """Sort the T*K routed slots by expert (stable). ``ids_TK``: int [T, K] expert ids.
    With ``capacity_factor``, each expert keeps at most ``expert_capacity(...)`` rows: those with
    the highest ``probs_TK`` (ties: lower slot), in ascending slot order. ``blocks`` =
    (slots per sort program, blocks per prefix step), powers of two, overrides the defaults."""
    if ids_TK.dim() != 2 or ids_TK.dtype.is_floating_point or ids_TK.dtype == torch.bool:
        raise ValueError(f"ids_TK must be an int [T, K] tensor, got {ids_TK.dtype} "
                         f"{tuple(ids_TK.shape)}")
    device = check_device(ids_TK)
    T, K = ids_TK.shape
    E, N = int(num_experts), T * K
    if device.type == "cpu" and N and (int(ids_TK.min()) < 0 or int(ids_TK.max()) >= E):
        # Checked where it is free; on GPU this would sync (the kernel's device_assert fires
        # in debug builds instead).
        raise ValueError(f"expert ids must lie in [0, {E}), got [{int(ids_TK.min())}, "
                         f"{int(ids_TK.max())}]")
    ids_N = ids_TK.reshape(-1).contiguous()
    i32 = dict(dtype=torch.int32, device=device)
    sort_index_N = torch.empty(N, **i32)
    sorted_ids_N = torch.empty(N, **i32)
    inverse_N = torch.empty(N, **i32)
    counts_E = torch.zeros(E, **i32)
    offsets_E1 = torch.zeros(E + 1, **i32)
    if N:
        e_pad = next_pow2(E)
        BLOCK_N, BLOCK_B = blocks if blocks is not None else route_blocks(N, e_pad)
        B = triton.cdiv(N, BLOCK_N)
        counts_BE = torch.empty(B, E, **i32)
        start_BE = torch.empty(B, E, **i32)
        _route_count_kernel[(B,)](ids_N, counts_BE, N, E, BLOCK_N=BLOCK_N, E_PAD=e_pad)
        _route_prefix_kernel[(1,)](counts_BE, start_BE, counts_E, offsets_E1, B, E,
                                   BLOCK_B=BLOCK_B, E_PAD=e_pad)
        _route_scatter_kernel[(B,)](ids_N, start_BE, sort_index_N, sorted_ids_N, inverse_N, N,
                                    E, BLOCK_N=BLOCK_N, E_PAD=e_pad)
    meta = DispatchMeta(sorted_ids_N, sort_index_N, inverse_N, offsets_E1, counts_E,
                        num_dropped=0, capacity=None, num_tokens=T, top_k=K)
    if capacity_factor is None:
        return meta
    if probs_TK is None or probs_TK.shape != ids_TK.shape:
        raise ValueError("capacity_factor needs probs_TK of the same shape as ids_TK")
    return _apply_capacity(meta, probs_TK, expert_capacity(capacity_factor, T, K, E))


def _apply_capacity(meta: DispatchMeta, probs_TK: torch.Tensor, capacity: int) -> DispatchMeta:
    """Keep each expert's ``capacity`` highest-prob rows. Plain torch (two stable argsorts and a
    compaction; it syncs once, to size the kept rows): capacity routing is the rarer path and
    the sort by prob within an expert is not a counting sort."""
    sorted_ids = meta.sorted_expert_ids_N.long()
    prob_N = probs_TK.detach().reshape(-1)[meta.sort_index_N.long()]
    # Rows are in (expert, slot) order: a stable sort by descending prob then a stable sort by
    # expert gives (expert, prob descending, slot ascending).
    by_prob = torch.argsort(prob_N, descending=True, stable=True)
    order = by_prob[torch.argsort(sorted_ids[by_prob], stable=True)]
    rank_N = torch.empty_like(order)
    positions = torch.arange(order.numel(), device=order.device)
    rank_N[order] = positions - meta.offsets_E1.long()[sorted_ids[order]]
    keep_N = rank_N < capacity
    kept = keep_N.nonzero().squeeze(1)  # ascending: (expert, slot) order is kept
    new_row_N = torch.where(keep_N, torch.cumsum(keep_N, 0) - 1, -1)
    inverse = torch.where(meta.inverse_TK >= 0, new_row_N[meta.inverse_TK.long()], -1)
    counts_E = meta.counts_E.clamp(max=capacity)
    offsets_E1 = torch.zeros_like(meta.offsets_E1)
    offsets_E1[1:] = torch.cumsum(counts_E, 0)
    return DispatchMeta(meta.sorted_expert_ids_N[kept], meta.sort_index_N[kept],
                        inverse.to(torch.int32), offsets_E1, counts_E.to(torch.int32),
                        num_dropped=meta.num_rows - kept.numel(), capacity=capacity,
                        num_tokens=meta.num_tokens, top_k=meta.top_k)


# ----------------------------------------------------------------------------------------------
# Row kernels. Both compute in fp32 (fp64 for fp64 inputs) right after loading: free for a
# memory-bound kernel, exact for a copy, and required under the interpreter (bf16 arithmetic
# there is wrong).
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dispatch_fwd_kernel(src_TD, sort_index_N, scale_TK, dot_ND, dot_TK, out_ND, N, D,
                         D_SPAN, stride_src, stride_out, stride_dot, K: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SCALE: tl.constexpr,
                         HAS_DOT: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """out[n] = scale[slot] * src[slot // K] with slot = sort_index[n], over columns
    [pid1 * D_SPAN, +D_SPAN). With HAS_DOT (one program spans all of D), also
    dot_TK[slot] = <src[slot // K], dot_ND[n]>: combine's weight gradient, fused so grad_out
    is read once. K is a constexpr (1 or 2 in practice): slot // K is a shift, not a runtime
    integer division."""
    pid_n = tl.program_id(0)
    d_lo = tl.program_id(1) * D_SPAN
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    slot = tl.load(sort_index_N + rows, mask=row_mask, other=0)
    src_row = (slot // K).to(tl.int64) * stride_src  # int64: T*D may pass 2**31
    out_row = rows.to(tl.int64) * stride_out
    if HAS_SCALE:
        scale = tl.load(scale_TK + slot, mask=row_mask, other=0).to(ACC_DTYPE)
    if HAS_DOT:
        dot_row = rows.to(tl.int64) * stride_dot
        dot = tl.zeros([BLOCK_N], dtype=ACC_DTYPE)
    for d0 in range(d_lo, d_lo + D_SPAN, BLOCK_D):  # D_SPAN is a multiple of BLOCK_D
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        v = tl.load(src_TD + src_row[:, None] + cols[None, :], mask=mask, other=0).to(ACC_DTYPE)
        if HAS_DOT:
            y = tl.load(dot_ND + dot_row[:, None] + cols[None, :], mask=mask, other=0)
            dot += tl.sum(v * y.to(ACC_DTYPE), axis=1)
        if HAS_SCALE:
            v = v * scale[:, None]
        tl.store(out_ND + out_row[:, None] + cols[None, :], v, mask=mask)
    if HAS_DOT:
        tl.store(dot_TK + slot, dot, mask=row_mask)


@triton.jit
def _dispatch_bwd_kernel(src_ND, inverse_TK, weights_TK, out_TD, T, D, stride_src, stride_out,
                         K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                         HAS_WEIGHTS: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """out[t] = sum over k (in order) of weights[t, k] * src[inverse[t*K + k]], skipping dropped
    slots (-1). One program owns its tokens' output: deterministic, no atomics. The K loop is
    unrolled (K constexpr): the K row loads of a tile are all in flight at once, where a runtime
    loop issued them one after another."""
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = toks < T
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=ACC_DTYPE)
    for k in tl.static_range(K):
        row = tl.load(inverse_TK + toks * K + k, mask=tok_mask, other=-1)
        kept = row >= 0
        src_row = row.to(tl.int64) * stride_src
        v = tl.load(src_ND + src_row[:, None] + cols[None, :],
                    mask=kept[:, None] & col_mask[None, :], other=0).to(ACC_DTYPE)
        if HAS_WEIGHTS:
            w = tl.load(weights_TK + toks * K + k, mask=kept, other=0).to(ACC_DTYPE)
            v = v * w[:, None]
        acc += v
    out_row = toks.to(tl.int64) * stride_out
    tl.store(out_TD + out_row[:, None] + cols[None, :], acc,
             mask=tok_mask[:, None] & col_mask[None, :])


# GPU (rows, columns) per program, one table per op, and each op's spill-free candidates (all
# at 4 warps; compiled for sm90 by tests/kernels/test_kernel_report.py, timed on a card by
# benchmarks/bench_tile_sweep.py, which writes the winners to pin here). Not yet timed on a card.
#
# dispatch_fwd: 8 x 1024 tiles (64 elements per thread at 4 warps), one column block per
# program; with the fused dot (combine's backward) one program loops over all of D, 16 x 256 at
# a time.
DISPATCH_FWD_BLOCKS = (8, 1024)
DISPATCH_FWD_CANDIDATES = ((8, 1024), (4, 1024), (16, 512))
DISPATCH_FWD_DOT_BLOCKS = (16, 256)
DISPATCH_FWD_DOT_CANDIDATES = ((16, 256), (8, 512), (32, 128))
# dispatch_bwd (combine's forward), per width D: the first tile whose columns divide D. At 16 x
# 512 with a runtime K loop the weighted kernel took 160-162 registers on sm90 (3 CTAs, 12 warps
# per SM; mm1-moe kernels report at mm1-7b-moe). With K a constexpr (the loop unrolled), 4 x
# 1024 takes 40 registers (44 with triton 3.6): 10-12 CTAs, 40-48 warps per SM; 8 x 512 takes
# 54: 9 CTAs. 4 x 1024 where 1024 divides D (mm1-7b-moe's 4096); else 8 x 512 (mm1-3b-moe's
# 2560: 5 full column blocks instead of 3 with a half-masked last one).
DISPATCH_BWD_TILES = ((4, 1024), (8, 512))
DISPATCH_BWD_CANDIDATES = ((4, 1024), (8, 512), (16, 256), (2, 2048))


def dispatch_bwd_gpu_blocks(D: int) -> Tuple[int, int]:
    """dispatch_bwd's GPU tile for width D (see DISPATCH_BWD_TILES)."""
    return next((t for t in DISPATCH_BWD_TILES if D % t[1] == 0), DISPATCH_BWD_TILES[-1])


def _row_blocks(rows: int, D: int, blocks: Blocks, gpu: Tuple[int, int]) -> Tuple[int, int]:
    if blocks is not None:
        return blocks
    if use_interpreter_tiles():  # one or a few programs: the interpreter pays per program
        block_d = next_pow2(D)
        return max(1, min(next_pow2(rows), (1 << 20) // block_d)), block_d
    return gpu


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def dispatch_fwd(x_TD: torch.Tensor, meta: DispatchMeta, blocks: Blocks = None,
                 scale_TK: Optional[torch.Tensor] = None, dot_ND: Optional[torch.Tensor] = None
                 ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """x_ND[n] = x_TD[sort_index[n] // K] (times ``scale_TK[slot]`` if given). With ``dot_ND``,
    also returns dot_TK[slot] = <x_TD[slot // K], dot_ND[n]> (0 for dropped slots).
    ``blocks`` = (rows, columns) per program overrides the defaults."""
    check_device(x_TD, meta.sort_index_N)
    if x_TD.dim() != 2 or x_TD.shape[0] != meta.num_tokens:
        raise ValueError(f"x_TD must be [{meta.num_tokens}, D], got {tuple(x_TD.shape)}")
    x_TD = _rows_contiguous(x_TD)
    N, D = meta.num_rows, x_TD.shape[1]
    gpu = DISPATCH_FWD_DOT_BLOCKS if dot_ND is not None else DISPATCH_FWD_BLOCKS
    BLOCK_N, BLOCK_D = _row_blocks(N, D, blocks, gpu)
    out_ND = torch.empty(N, D, dtype=x_TD.dtype, device=x_TD.device)
    dot_TK = None
    if dot_ND is not None:
        dot_ND = _rows_contiguous(dot_ND)
        dot_dtype = scale_TK.dtype if scale_TK is not None else x_TD.dtype
        dot_TK = torch.zeros(meta.inverse_TK.numel(), dtype=dot_dtype, device=x_TD.device)
    d_span = triton.cdiv(D, BLOCK_D) * BLOCK_D if dot_ND is not None else BLOCK_D
    if N and D:
        grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(D, d_span))
        _dispatch_fwd_kernel[grid](
            x_TD, meta.sort_index_N, scale_TK if scale_TK is not None else x_TD,
            dot_ND if dot_ND is not None else x_TD, dot_TK if dot_TK is not None else x_TD,
            out_ND, N, D, d_span, x_TD.stride(0), out_ND.stride(0),
            dot_ND.stride(0) if dot_ND is not None else 0, K=meta.top_k,
            BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, HAS_SCALE=scale_TK is not None,
            HAS_DOT=dot_ND is not None, ACC_DTYPE=kernel_dtypes(x_TD.dtype).acc)
    return out_ND if dot_ND is None else (out_ND, dot_TK)


def dispatch_bwd(grad_ND: torch.Tensor, meta: DispatchMeta, blocks: Blocks = None,
                 weights_TK: Optional[torch.Tensor] = None) -> torch.Tensor:
    """grad_TD[t] = sum_k weights[t, k] * grad_ND[inverse[t*K + k]] (weights 1 if None; dropped
    slots add nothing), in ``grad_ND``'s dtype. Also combine's forward."""
    check_device(grad_ND, meta.inverse_TK)
    if grad_ND.dim() != 2 or grad_ND.shape[0] != meta.num_rows:
        raise ValueError(f"expected [{meta.num_rows}, D] rows, got {tuple(grad_ND.shape)}")
    grad_ND = _rows_contiguous(grad_ND)
    T, D = meta.num_tokens, grad_ND.shape[1]
    BLOCK_T, BLOCK_D = _row_blocks(T, D, blocks, dispatch_bwd_gpu_blocks(D))
    out_TD = torch.empty(T, D, dtype=grad_ND.dtype, device=grad_ND.device)
    if weights_TK is not None:
        weights_TK = weights_TK.contiguous()
    if T and D:
        grid = (triton.cdiv(T, BLOCK_T), triton.cdiv(D, BLOCK_D))
        _dispatch_bwd_kernel[grid](
            grad_ND, meta.inverse_TK, weights_TK if weights_TK is not None else grad_ND, out_TD,
            T, D, grad_ND.stride(0), out_TD.stride(0), K=meta.top_k,
            BLOCK_T=BLOCK_T, BLOCK_D=BLOCK_D, HAS_WEIGHTS=weights_TK is not None,
            ACC_DTYPE=kernel_dtypes(grad_ND.dtype).acc)
    return out_TD


class DispatchFunction(torch.autograd.Function):
    """x_TD -> x_ND; backward sums each token's K row gradients (dispatch_bwd)."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, meta: DispatchMeta, blocks: Blocks = None):
        ctx.meta, ctx.blocks = meta, blocks
        return dispatch_fwd(x_TD, meta, blocks)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_x_ND: torch.Tensor):
        return dispatch_bwd(grad_x_ND, ctx.meta, ctx.blocks), None, None


def dispatch(x_TD: torch.Tensor, meta: DispatchMeta, blocks: Blocks = None) -> torch.Tensor:
    """Permute tokens into expert order: x_ND[n] = x_TD[meta.sort_index_N[n] // K];
    [T, D] -> [N_kept, D]. Differentiable in ``x_TD``."""
    return DispatchFunction.apply(x_TD, meta, blocks)
