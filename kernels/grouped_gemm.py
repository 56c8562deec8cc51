"""Grouped expert GEMMs over expert-sorted rows: forward, input-gradient and weight-gradient
kernels, the tile schedule they share, and the deterministic reduction of gathered-row grads.

Shape legend: T tokens, D model width, F expert FFN width, E experts, K top-k, N = T*K routed
rows (N_kept after capacity drops); I, O the input and output width of one grouped GEMM
(D -> 2F for fc1, F -> D for fc2). Tiles: BLOCK_M rows x BLOCK_N output columns, stepping
BLOCK_K along the reduction.

Rows are expert-sorted: expert e owns rows ``offsets_E1[e]:offsets_E1[e+1]`` (int32 [E+1],
offsets[0] = 0, offsets[E] = N); empty and one-row experts are fine. ``gather_index_N`` makes
row n read token ``gather_index_N[n]`` of a token matrix (ScatterMoE-style: no permuted copy of
x_TD); ``row_scale_N`` multiplies output row n in the epilogue (the routing weight).

Layers: ``_grouped_mm_kernel`` / ``_grouped_mm_dw_kernel`` / ``_gather_bwd_kernel`` ->
``grouped_mm_fwd`` / ``grouped_mm_da`` / ``grouped_mm_dw`` / ``gather_rows_backward`` ->
``GroupedMMFunction`` -> ``grouped_mm(...)``. The fused SwiGLU expert MLP built on these lives in
``experts.py``.

Design notes:
- Tile schedule: expert e gets ceil(count_e / BLOCK_M) row tiles. The launcher builds the
  tile -> (expert, first row) map on the device with torch ops (cumsum + searchsorted), over an
  upper bound of cdiv(N, BLOCK_M) + E tiles known from shapes alone: no host sync. Programs past
  the last real tile exit at once. Row tiles are ordered in GROUP_M bands over the output columns
  (Triton tutorial 03) so a band's weight tiles stay in L2.
- dA reuses the forward kernel with the weight's strides transposed (w_EIO viewed as w_EOI).
  The grad of the row scale, rowdot(a[src(n)] @ w[e], dC[n]) = rowdot(a[src(n)], dC[n] @ w[e]^T),
  is fused into the dA epilogue as one partial dot per (row, column tile), written to an
  [N, tiles] buffer and summed by torch: deterministic, no float atomics.
- dW[e] = A_e^T (s * dC_e): one program per (expert, I tile, O tile) loops over the expert's rows,
  so every dW element is a single fp32 reduction (no split-K, deterministic); empty experts
  write zeros. A gathered A is copied into row order first (see grouped_mm_dw: a row index
  loaded inside the main loop defeats Triton's pipelining).
- With a gather, dA comes out per row [N, I]; ``gather_rows_backward`` sums the rows of each token
  in ascending row order (a stable argsort of the gather index, then one program per token): the
  same bits on every run, unlike index_add_ on CUDA.
- Accumulation in fp32 (fp64 for fp64 inputs, for gradcheck); outputs in the input dtype. fp32
  inputs use IEEE dots (torch's default matmul precision), not TF32. Under the interpreter every
  tile is upcast right after loading (it computes bf16 dots wrongly).

Caution: tested in the Triton interpreter (CPU) in fp32/fp64 and compiled for sm90/sm80 with bf16;
not yet run or timed on a GPU. GPU tile sizes are untuned guesses (see GPU_BLOCKS).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import (acc_dtype, check_device, kernel_dtypes, next_pow2,
                      use_interpreter_tiles)


@dataclasses.dataclass(frozen=True)
class GemmBlocks:
    """Tile shape and launch options of one kernel. For ``_grouped_mm_dw_kernel`` block_m tiles I
    (the rows of dW), block_n tiles O and block_k steps over the expert's rows."""
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 4


# GPU tiles, one table per kernel, each with its spill-free candidates (compiled for sm90 by
# tests/kernels/test_kernel_report.py, timed on a card by benchmarks/bench_tile_sweep.py, whose
# winners JSON says what to pin here). Tables rather than @triton.autotune: BLOCK_M is fixed
# before the launch by the tile schedule that fc1, fc2 and dA share, BLOCK_K sets the dW
# summation order (autotune picking per process would make ranks and runs differ in their
# bits), and the interpreter wants its own tiles (_common.use_interpreter_tiles).
#
# Forward / dA: the shape of a good bf16 Triton matmul on H100 (128x128x64, 8 warps, 4 stages:
# 32 KiB of shared memory per stage, 128 KiB: 1 CTA per SM). UNTUNED: chosen without a GPU.
# Candidates keep BLOCK_M = 128, the schedule swiglu_experts shares with fc1 and fc2's backward:
# 3 stages (96 KiB, 114 registers: 2 CTAs per SM with triton 3.6 and 3.9), 128x256 (144 KiB,
# 201-205 registers), 128x64 at 4 warps (96 KiB, 126-128 registers: 2 CTAs of 4 warps).
GPU_BLOCKS = GemmBlocks(128, 128, 64, group_m=8, num_warps=8, num_stages=4)
GPU_CANDIDATES = (GPU_BLOCKS, GemmBlocks(128, 128, 64, num_warps=8, num_stages=3),
                  GemmBlocks(128, 256, 64, num_warps=8, num_stages=3),
                  GemmBlocks(128, 64, 64, num_warps=4, num_stages=4))
# dW, per mean rows per expert (the reduction length of every program). At 128x128x64, 4 stages
# (128 KiB of shared memory) it ran 1 CTA per SM, and at mm1-7b-moe's 256 rows per expert (EP=1)
# a program makes only 4 K-steps: prologue and epilogue are most of it and nothing overlaps
# them. 3 stages (96 KiB) take 127 registers with triton 3.9 but 129 with 3.6 (the GPU image's),
# one over the 128 at which 2 CTAs of 8 warps fit: still 1 CTA per SM there. 128x128x32, 4
# stages: 64 KiB, 99 registers (101 with 3.6), 2 CTAs per SM under both, so one CTA's epilogue
# overlaps the other's loads; 8 K-steps at 256 rows per expert (mm1-moe kernels report, sm90).
# Past 512 rows per expert (EP=8: 2048 rows, 64 K-steps) the main loop dominates and the same
# tile stays until a card says otherwise (the sweep times both buckets). Not timed on a card.
_DW_2CTA = GemmBlocks(128, 128, 32, group_m=8, num_warps=8, num_stages=4)
GPU_DW_TILES = ((512, _DW_2CTA), (None, _DW_2CTA))
GPU_DW_CANDIDATES = (_DW_2CTA, GemmBlocks(128, 128, 64, num_warps=8, num_stages=3),
                     GemmBlocks(128, 128, 64, num_warps=8, num_stages=4),
                     GemmBlocks(128, 256, 64, num_warps=8, num_stages=3),
                     GemmBlocks(64, 128, 64, num_warps=4, num_stages=4))


def dw_gpu_blocks(rows_per_expert: int) -> GemmBlocks:
    """The dW kernel's GPU tile for this mean number of rows per expert (GPU_DW_TILES)."""
    return next(b for bound, b in GPU_DW_TILES if bound is None or rows_per_expert <= bound)


# Token-sum kernel: (tokens, columns) per program; memory bound, 4K fp32 accumulators over 4 warps.
GPU_GATHER_BWD_BLOCK = (4, 1024)


def interpreter_blocks(n_rows: int, width_k: int, width_n: int) -> GemmBlocks:
    """Interpreter tiles: each tl op is one numpy call over a tile, so few large programs win.
    BLOCK_M depends on N alone, so every kernel of one call can share a tile schedule."""
    clamp = lambda v, hi: min(hi, max(16, next_pow2(v)))  # noqa: E731
    return GemmBlocks(clamp(n_rows, 64), clamp(width_n, 128), clamp(width_k, 128),
                      group_m=8, num_warps=4, num_stages=1)


def pick_blocks(n_rows: int, width_k: int, width_n: int, override: Optional[GemmBlocks],
                gpu: GemmBlocks = GPU_BLOCKS) -> GemmBlocks:
    if override is not None:
        return override
    return interpreter_blocks(n_rows, width_k, width_n) if use_interpreter_tiles() else gpu


class TileSchedule(NamedTuple):
    """The row tiles of a grouped GEMM: tile_expert int32 [tiles] (-1 past the last real tile)
    and tile_row int32 [tiles] (the tile's first row); tiles = cdiv(N, block_m) + E."""
    tile_expert: torch.Tensor
    tile_row: torch.Tensor
    block_m: int

    @property
    def num_tiles(self) -> int:
        return self.tile_expert.numel()


def tile_schedule(offsets_E1: torch.Tensor, n_rows: int, block_m: int) -> TileSchedule:
    """Built on the device with torch ops, no host sync: sum_e ceil(c_e / B) < N / B + E."""
    E = offsets_E1.numel() - 1
    offsets = offsets_E1.long()
    tiles_E = (offsets[1:] - offsets[:-1] + block_m - 1) // block_m
    tile_end_E = torch.cumsum(tiles_E, 0)
    t = torch.arange(triton.cdiv(n_rows, block_m) + E, device=offsets.device)
    e = torch.searchsorted(tile_end_E, t, right=True)  # E for tiles past the last real one
    e_c = e.clamp(max=E - 1)
    row = offsets[e_c] + (t - (tile_end_E - tiles_E)[e_c]) * block_m
    real = e < E
    return TileSchedule(torch.where(real, e, -1).to(torch.int32),
                        torch.where(real, row, 0).to(torch.int32), block_m)


@triton.jit
def swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Program id -> (row tile, column tile), GROUP_M row tiles sweeping the columns together."""
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % in_group) % group_m, (pid % in_group) // group_m


@triton.jit
def tile_rows(tile_expert_ptr, tile_row_ptr, offsets_ptr, pid_m, BLOCK_M: tl.constexpr):
    """(expert, rows, row_ok, rows clamped into the expert) of row tile ``pid_m``; expert < 0 for
    a padding tile. Clamped rows let the main loop load without a row mask."""
    e = tl.load(tile_expert_ptr + pid_m)
    row0 = tl.load(tile_row_ptr + pid_m)
    row_end = tl.load(offsets_ptr + tl.maximum(e, 0) + 1)
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    return e, rows, row_ok, tl.where(row_ok, rows, row0)


@triton.jit
def mm_mainloop(a_ptr, w_ptr, src, e, cols, I, stride_am, stride_ak, stride_we, stride_wk,
                stride_wn, ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """acc[BLOCK_M, BLOCK_N] = a[src, :] @ w[e][:, cols]; src and cols must be in bounds (the
    callers clamp them), the reduction tail is masked."""
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + src[:, None] * stride_am + ks[None, :] * stride_ak
    w_ptrs = (w_ptr + e.to(tl.int64) * stride_we + ks[:, None] * stride_wk
              + cols.to(tl.int64)[None, :] * stride_wn)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k in range(0, tl.cdiv(I, BLOCK_K)):
        k_ok = ks < I - k * BLOCK_K
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST:
            a = a.to(ACC_DTYPE)
            w = w.to(ACC_DTYPE)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def _grouped_mm_kernel(a_ptr, w_ptr, c_ptr, aux_ptr, part_ptr, gather_ptr, scale_ptr,
                       offsets_ptr, tile_expert_ptr, tile_row_ptr, num_tiles_m, I, O,
                       stride_am, stride_ak, stride_we, stride_wk, stride_wn,
                       stride_cm, stride_cn, stride_xm, stride_xn,
                       GATHER_A: tl.constexpr, GATHER_AUX: tl.constexpr,
                       HAS_SCALE: tl.constexpr, ROWDOT: tl.constexpr,
                       ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr):
    """c[n, :] = (a[src(n)] @ w[e(n)]) * scale[n]. With ROWDOT, also part[n, pid_n] = the dot of
    the unscaled tile row with aux[src'(n), cols] (the row-scale grad in the dA pass)."""
    num_tiles_n = tl.cdiv(O, BLOCK_N)
    pid_m, pid_n = swizzle(tl.program_id(0), num_tiles_m, num_tiles_n, GROUP_M)
    e, rows, row_ok, rows_c = tile_rows(tile_expert_ptr, tile_row_ptr, offsets_ptr, pid_m,
                                        BLOCK_M)
    if e < 0:
        return
    if GATHER_A:
        src = tl.load(gather_ptr + rows_c).to(tl.int64)
    else:
        src = rows_c.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < O
    # Wrap, don't clamp: `% O` keeps the columns provably contiguous (tl.where would not), so the
    # weight loads vectorize and the main loop pipelines; wrapped columns are masked at the store.
    cols_c = cols % O
    acc = mm_mainloop(a_ptr, w_ptr, src, e, cols_c, I, stride_am, stride_ak, stride_we,
                      stride_wk, stride_wn, ACC_DTYPE, UPCAST, PRECISION, BLOCK_M, BLOCK_N,
                      BLOCK_K)
    if ROWDOT:
        if GATHER_AUX:
            xsrc = tl.load(gather_ptr + rows_c).to(tl.int64)
        else:
            xsrc = rows_c.to(tl.int64)
        x = tl.load(aux_ptr + xsrc[:, None] * stride_xm + cols_c[None, :] * stride_xn,
                    mask=col_ok[None, :], other=0.0).to(ACC_DTYPE)
        tl.store(part_ptr + rows * num_tiles_n + pid_n, tl.sum(x * acc, axis=1), mask=row_ok)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + rows_c).to(ACC_DTYPE)[:, None]
    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grouped_mm_dw_kernel(a_ptr, dc_ptr, dw_ptr, scale_ptr, offsets_ptr, I, O,
                          stride_am, stride_ak, stride_dm, stride_dn,
                          stride_we, stride_wk, stride_wn, HAS_SCALE: tl.constexpr,
                          ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
                          PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """dw[e, i, o] = sum over expert e's rows n of a[n, i] * scale[n] * dc[n, o]."""
    e = tl.program_id(1)
    pid_i, pid_o = swizzle(tl.program_id(0), tl.cdiv(I, BLOCK_M), tl.cdiv(O, BLOCK_N), GROUP_M)
    row_start = tl.load(offsets_ptr + e)
    row_end = tl.load(offsets_ptr + e + 1)
    ii = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    oo = pid_o * BLOCK_N + tl.arange(0, BLOCK_N)
    i_ok = ii < I
    o_ok = oo < O
    ii_c = (ii % I).to(tl.int64)  # wrapped (contiguous, in bounds), masked at the store
    oo_c = (oo % O).to(tl.int64)
    rr = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for r0 in range(row_start, row_end, BLOCK_K):
        rows = r0 + rr
        r_ok = rows < row_end
        rows_c = tl.where(r_ok, rows, r0).to(tl.int64)  # in bounds; dc's mask zeroes them
        a = tl.load(a_ptr + rows_c[None, :] * stride_am + ii_c[:, None] * stride_ak)
        dc = tl.load(dc_ptr + rows_c[:, None] * stride_dm + oo_c[None, :] * stride_dn,
                     mask=r_ok[:, None], other=0.0)
        if UPCAST:
            a = a.to(ACC_DTYPE)
            dc = dc.to(ACC_DTYPE)
        if HAS_SCALE:
            s = tl.load(scale_ptr + rows_c).to(ACC_DTYPE)
            dc = (dc.to(ACC_DTYPE) * s[:, None]).to(a.dtype)
        acc = tl.dot(a, dc, acc, input_precision=PRECISION)
    dw_ptrs = (dw_ptr + e.to(tl.int64) * stride_we + ii_c[:, None] * stride_wk
               + oo_c[None, :] * stride_wn)
    tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=i_ok[:, None] & o_ok[None, :])


@triton.jit
def _gather_bwd_kernel(g_ptr, out_ptr, perm_ptr, seg_ptr, T, C, stride_gm, stride_gc,
                       stride_om, stride_oc, ACC_DTYPE: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """out[t, :] = sum of g[perm[j], :] for j in seg[t]:seg[t+1], in that order, for a block of
    tokens: step j adds every token's j-th row (tokens with fewer rows add nothing)."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = tokens < T
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    start = tl.load(seg_ptr + tokens, mask=t_ok, other=0)
    count = tl.load(seg_ptr + tokens + 1, mask=t_ok, other=0) - start
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=ACC_DTYPE)
    for j in range(0, tl.max(count, axis=0)):
        has = j < count
        n = tl.load(perm_ptr + start + j, mask=has, other=0).to(tl.int64)
        acc += tl.load(g_ptr + n[:, None] * stride_gm + cols[None, :] * stride_gc,
                       mask=has[:, None] & c_ok[None, :], other=0.0).to(ACC_DTYPE)
    tl.store(out_ptr + tokens.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_oc,
             acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & c_ok[None, :])


def contiguous_routing(offsets_E1, gather_index_N, row_scale_N):
    """The kernels index these 1-D tensors with unit stride: make them so (no-ops normally)."""
    return (offsets_E1.contiguous(),
            gather_index_N.contiguous() if gather_index_N is not None else None,
            row_scale_N.contiguous() if row_scale_N is not None else None)


def check_grouped(a: torch.Tensor, w_EIO: torch.Tensor, offsets_E1: torch.Tensor,
                  gather_index_N: Optional[torch.Tensor], row_scale_N: Optional[torch.Tensor],
                  ) -> int:
    """Validates shapes (not offset values: that would sync); returns N."""
    check_device(*[t for t in (a, w_EIO, offsets_E1, gather_index_N, row_scale_N)
                   if t is not None])
    if a.dim() != 2 or w_EIO.dim() != 3 or a.shape[1] != w_EIO.shape[1]:
        raise ValueError(f"a {tuple(a.shape)} @ w_EIO {tuple(w_EIO.shape)}: need [rows, I] and "
                         "[E, I, O]")
    if a.dtype != w_EIO.dtype:
        raise ValueError(f"a is {a.dtype} but w_EIO is {w_EIO.dtype}")
    if offsets_E1.shape != (w_EIO.shape[0] + 1,):
        raise ValueError(f"offsets_E1 {tuple(offsets_E1.shape)} for E={w_EIO.shape[0]} experts")
    n_rows = a.shape[0] if gather_index_N is None else gather_index_N.numel()
    if row_scale_N is not None and row_scale_N.shape != (n_rows,):
        raise ValueError(f"row_scale_N {tuple(row_scale_N.shape)} for N={n_rows} rows")
    return n_rows


def _launch_mm(a, w, offsets_E1, n_rows, gather, scale, aux, gather_aux, schedule, blocks):
    """c_NO = (a[src] @ w[e]) * scale, and the per-tile row dots with aux when aux is given."""
    I, O = w.shape[1], w.shape[2]
    blocks = pick_blocks(n_rows, I, O, blocks)
    if schedule is None:
        schedule = tile_schedule(offsets_E1, n_rows, blocks.block_m)
    assert schedule.block_m == blocks.block_m, "the tile schedule was built for another BLOCK_M"
    c = torch.empty(n_rows, O, device=a.device, dtype=a.dtype)
    tiles_n = triton.cdiv(O, blocks.block_n)
    dt = kernel_dtypes(a.dtype)
    part = None
    if aux is not None:
        part = torch.zeros(n_rows, tiles_n, device=a.device, dtype=acc_dtype(a.dtype))
    if n_rows == 0 or O == 0:
        return c, part
    dummy = offsets_E1  # any tensor for an unused pointer argument
    x = aux if aux is not None else dummy
    gather = gather if gather is not None else dummy
    _grouped_mm_kernel[(schedule.num_tiles * tiles_n,)](
        a, w, c, x, part if part is not None else dummy, gather,
        scale if scale is not None else dummy, offsets_E1, schedule.tile_expert,
        schedule.tile_row, schedule.num_tiles, I, O, a.stride(0), a.stride(1), w.stride(0),
        w.stride(1), w.stride(2), c.stride(0), c.stride(1),
        x.stride(0) if aux is not None else 0, x.stride(1) if aux is not None else 0,
        GATHER_A=gather is not dummy and not gather_aux, GATHER_AUX=gather_aux,
        HAS_SCALE=scale is not None, ROWDOT=aux is not None, ACC_DTYPE=dt.acc,
        UPCAST=dt.upcast, PRECISION=dt.precision, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
        BLOCK_K=blocks.block_k, GROUP_M=blocks.group_m, num_warps=blocks.num_warps,
        num_stages=blocks.num_stages)
    return c, part


def grouped_mm_fwd(a: torch.Tensor, w_EIO: torch.Tensor, offsets_E1: torch.Tensor,
                   gather_index_N: Optional[torch.Tensor] = None,
                   row_scale_N: Optional[torch.Tensor] = None, *,
                   schedule: Optional[TileSchedule] = None,
                   blocks: Optional[GemmBlocks] = None) -> torch.Tensor:
    """c_NO[n] = a[src(n)] @ w_EIO[e(n)] (* row_scale_N[n]); a is a_NI, or a_TI with
    ``gather_index_N``. w_EIO may be any strided view (a transposed one gives dA)."""
    n_rows = check_grouped(a, w_EIO, offsets_E1, gather_index_N, row_scale_N)
    c, _ = _launch_mm(a, w_EIO, offsets_E1, n_rows, gather_index_N, row_scale_N, None, False,
                      schedule, blocks)
    return c


def grouped_mm_da(dc_NO: torch.Tensor, w_EIO: torch.Tensor, offsets_E1: torch.Tensor,
                  row_scale_N: Optional[torch.Tensor] = None, a_fwd: Optional[torch.Tensor] = None,
                  gather_index_N: Optional[torch.Tensor] = None, *,
                  schedule: Optional[TileSchedule] = None, blocks: Optional[GemmBlocks] = None,
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Backward of ``grouped_mm_fwd`` to its input rows: (da_NI = row_scale_N * (dc_NO @ w[e]^T),
    grad_row_scale_N). da_NI is per routed row; with a gather, ``gather_rows_backward`` sums it
    per token. grad_row_scale_N = rowdot(a_fwd[src(n)], dc_NO[n] @ w[e]^T) needs ``a_fwd``
    (the forward input, gathered by ``gather_index_N``); None without a row scale."""
    w_EOI = w_EIO.transpose(1, 2)
    n_rows = check_grouped(dc_NO, w_EOI, offsets_E1, None, row_scale_N)
    aux = a_fwd if row_scale_N is not None else None  # no row scale: nothing to differentiate
    da, part = _launch_mm(dc_NO, w_EOI, offsets_E1, n_rows, gather_index_N, row_scale_N, aux,
                          gather_index_N is not None, schedule, blocks)
    grad_scale = part.sum(1).to(row_scale_N.dtype) if part is not None else None
    return da, grad_scale


def grouped_mm_dw(a: torch.Tensor, dc_NO: torch.Tensor, offsets_E1: torch.Tensor,
                  gather_index_N: Optional[torch.Tensor] = None,
                  row_scale_N: Optional[torch.Tensor] = None, *,
                  blocks: Optional[GemmBlocks] = None) -> torch.Tensor:
    """dw_EIO[e] = a[src(rows of e)]^T @ (row_scale * dc_NO)[rows of e]; zero for empty experts.
    a is a_NI, or a_TI with ``gather_index_N``. Output in a's dtype.

    A gather is applied up front (an [N, I] copy) rather than in the main loop: a row index
    loaded inside the loop stops Triton from pipelining the gathered operand (compiled with
    16-byte-aligned args at 128x128x64, 4 stages: 64 KiB of shared memory instead of 128 KiB on
    sm90, 32 KiB instead of 96 KiB on sm80: no multi-buffering). ScatterMoE groups X the same way
    before its dW. The copy costs (bytes per element x matmul rate) / (O x copy bandwidth) of the
    GEMM's time: ~2% for fc1's dW (O = 2F = 24576) at H100's 790 TFLOP/s and 3 TB/s."""
    E = offsets_E1.numel() - 1
    I, O = a.shape[1], dc_NO.shape[1]
    n_rows = dc_NO.shape[0]
    check_device(a, dc_NO, offsets_E1)
    if gather_index_N is not None:
        if gather_index_N.numel() != n_rows:
            raise ValueError(f"gather_index_N has {gather_index_N.numel()} rows, dc_NO {n_rows}")
        a = a.index_select(0, gather_index_N.long())
    if blocks is None:
        blocks = (GemmBlocks(min(128, max(16, next_pow2(I))), min(128, max(16, next_pow2(O))),
                             min(64, max(16, next_pow2(n_rows))), num_warps=4, num_stages=1)
                  if use_interpreter_tiles() else dw_gpu_blocks(n_rows // max(E, 1)))
    dw = torch.empty(E, I, O, device=a.device, dtype=a.dtype)
    if dw.numel() == 0:
        return dw
    dt = kernel_dtypes(a.dtype)
    dummy = offsets_E1
    grid = (triton.cdiv(I, blocks.block_m) * triton.cdiv(O, blocks.block_n), E)
    _grouped_mm_dw_kernel[grid](
        a, dc_NO, dw, row_scale_N if row_scale_N is not None else dummy, offsets_E1, I, O,
        a.stride(0), a.stride(1), dc_NO.stride(0), dc_NO.stride(1),
        dw.stride(0), dw.stride(1), dw.stride(2), HAS_SCALE=row_scale_N is not None,
        ACC_DTYPE=dt.acc, UPCAST=dt.upcast, PRECISION=dt.precision, BLOCK_M=blocks.block_m,
        BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k, GROUP_M=blocks.group_m,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    return dw


def gather_rows_backward(g_NC: torch.Tensor, gather_index_N: torch.Tensor,
                         num_tokens: int) -> torch.Tensor:
    """out_TC[t] = sum of g_NC[n] over the rows n with gather_index_N[n] == t, in ascending n,
    accumulated in fp32 (fp64 for fp64) and rounded once: deterministic. Costs a stable argsort
    of N int32s, small next to the GEMMs."""
    check_device(g_NC, gather_index_N)
    idx = gather_index_N.long()
    perm_N = torch.argsort(idx, stable=True).to(torch.int32)
    seg_T1 = torch.zeros(num_tokens + 1, dtype=torch.int32, device=g_NC.device)
    seg_T1[1:] = torch.cumsum(torch.bincount(idx, minlength=num_tokens), 0)
    C = g_NC.shape[1]
    out = torch.empty(num_tokens, C, device=g_NC.device, dtype=g_NC.dtype)
    if out.numel() == 0:
        return out
    if use_interpreter_tiles():
        block_t, block_c = min(64, next_pow2(num_tokens)), min(256, next_pow2(C))
    else:
        block_t, block_c = GPU_GATHER_BWD_BLOCK
    _gather_bwd_kernel[(triton.cdiv(num_tokens, block_t), triton.cdiv(C, block_c))](
        g_NC, out, perm_N, seg_T1, num_tokens, C, g_NC.stride(0), g_NC.stride(1), out.stride(0),
        out.stride(1), ACC_DTYPE=kernel_dtypes(g_NC.dtype).acc, BLOCK_T=block_t, BLOCK_C=block_c,
        num_warps=4)
    return out


class GroupedMMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, w_EIO, offsets_E1, gather_index_N, row_scale_N, blocks):
        n_rows = check_grouped(a, w_EIO, offsets_E1, gather_index_N, row_scale_N)
        b = pick_blocks(n_rows, w_EIO.shape[1], w_EIO.shape[2], blocks)
        schedule = tile_schedule(offsets_E1, n_rows, b.block_m)
        c = grouped_mm_fwd(a, w_EIO, offsets_E1, gather_index_N, row_scale_N,
                           schedule=schedule, blocks=blocks)
        ctx.save_for_backward(a, w_EIO, offsets_E1, gather_index_N, row_scale_N)
        ctx.schedule, ctx.blocks = schedule, blocks
        return c

    @staticmethod
    def backward(ctx, dc_NO):
        a, w_EIO, offsets_E1, gather_index_N, row_scale_N = ctx.saved_tensors
        need_a, need_w, _, _, need_s, _ = ctx.needs_input_grad
        da = dw = ds = None
        if need_a or need_s:
            # The dA pass uses the same row tiles; its blocks default from (N, O, I).
            blocks = ctx.blocks or pick_blocks(dc_NO.shape[0], w_EIO.shape[2], w_EIO.shape[1],
                                               None)
            schedule = ctx.schedule if blocks.block_m == ctx.schedule.block_m else None
            da, ds = grouped_mm_da(dc_NO, w_EIO, offsets_E1, row_scale_N,
                                   a if need_s else None, gather_index_N, schedule=schedule,
                                   blocks=blocks)
            if need_a and gather_index_N is not None:
                da = gather_rows_backward(da, gather_index_N, a.shape[0])
        if need_w:
            dw = grouped_mm_dw(a, dc_NO, offsets_E1, gather_index_N, row_scale_N,
                               blocks=ctx.blocks)
        return (da if need_a else None), dw, None, None, (ds if need_s else None), None


def grouped_mm(a: torch.Tensor, w_EIO: torch.Tensor, offsets_E1: torch.Tensor,
               gather_index_N: Optional[torch.Tensor] = None,
               row_scale_N: Optional[torch.Tensor] = None, *,
               blocks: Optional[GemmBlocks] = None) -> torch.Tensor:
    """Grouped GEMM over expert-sorted rows, differentiable in a, w_EIO and row_scale_N:
    c_NO[n] = a[src(n)] @ w_EIO[e(n)] * row_scale_N[n]. a is a_NI (src(n) = n), or a_TI with
    src(n) = gather_index_N[n]; its grad then sums each token's rows deterministically.
    ``blocks`` overrides every kernel's tiles (tests use it to run GPU-sized tiles)."""
    offsets_E1, gather_index_N, row_scale_N = contiguous_routing(offsets_E1, gather_index_N,
                                                                 row_scale_N)
    return GroupedMMFunction.apply(a, w_EIO, offsets_E1, gather_index_N, row_scale_N, blocks)
