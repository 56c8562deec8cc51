"""The fused SwiGLU expert MLP over expert-sorted rows: fc1 with SwiGLU in its epilogue, fc2 with
the routing weight in its epilogue, and a full backward.

Shape legend: T tokens, D model width, F expert FFN width (F2 = 2F: [gate | up]), E experts,
K top-k, N = T*K routed rows (N_kept after capacity drops).

  gate_up_NF2 = x[src(n)] @ w1_EDF2[e(n)]          (fc1; src(n) = gather_index_N[n] or n)
  h_NF        = silu(gate) * up                    (fused into the fc1 epilogue)
  y_ND        = (h_NF @ w2_EFD[e(n)]) * row_scale_N (fc2; the scale fused into its epilogue)

Layers: ``_swiglu_fc1_kernel`` / ``_swiglu_fc2_bwd_kernel`` (+ the kernels of grouped_gemm.py) ->
``swiglu_fc1_fwd`` / ``swiglu_fc2_bwd`` -> ``SwiGLUExpertsFunction`` -> ``swiglu_experts(...)``.

Backward, kernel by kernel:
  1. ``_swiglu_fc2_bwd_kernel``: g = dy @ w2[e]^T, with the SwiGLU backward in its epilogue: it
     reloads gate/up, recomputes h (written for step 2), grad_row_scale partials rowdot(h, g),
     dh = s * g, d_gate = dh * up * silu'(gate), d_up = dh * silu(gate) -> d_gate_up_NF2.
  2. dw2 = h^T (s * dy)              (``_grouped_mm_dw_kernel``)
  3. dw1 = x[src]^T d_gate_up        (``_grouped_mm_dw_kernel`` with the gather)
  4. dx = d_gate_up @ w1[e]^T        (``_grouped_mm_kernel`` on w1's transposed strides), then,
     with a gather, each token's rows summed in row order (``gather_rows_backward``).

Saved for backward: save gate_up or recompute it? Per routed row, fc1 is 4DF FLOPs, fc2 2DF, the
backward 12DF (18DF per step). Saving gate_up costs 2F values per row; recomputing it costs a
second fc1 (4DF FLOPs, +22% of the step's expert FLOPs). For mm1-7b-moe (D=4096, F=12288, 4096
tokens x top-2 = 8192 rows per micro-batch) that is 384 MiB of bf16 per MoE layer saved, against
1.65 TFLOP (about 2-3 ms on an H100 at 550-790 TFLOP/s) per layer recomputed. h is never saved:
the backward rebuilds it from gate_up in step 1's epilogue (elementwise, free next to the GEMM).
Default: save (speed first); ``recompute_fc1=True`` trades the time for the memory.

Caution: tested in the Triton interpreter (CPU) in fp32/fp64 and compiled for sm90/sm80 with bf16;
not yet run or timed on a GPU. Tile sizes are untuned guesses (see FC1_GPU_BLOCKS).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, kernel_dtypes
from .grouped_gemm import (GemmBlocks, TileSchedule, check_grouped, contiguous_routing,
                           gather_rows_backward, grouped_mm_dw, grouped_mm_fwd, mm_mainloop,
                           pick_blocks, swizzle, tile_rows, tile_schedule)

# fc1 holds two accumulators (gate and up). At 128x128 each (a 128x256 fp32 output tile) it took
# 255 registers and spilled 16 B per thread on sm90 (mm1-moe kernels report); 128x64 each takes
# 124 registers, no spill, 32 KiB of shared memory per stage: 3 stages (96 KiB) leave room for
# 2 CTAs per SM on sm90 and fit sm80's 163 KiB. Compile-checked only: not yet timed on a GPU.
FC1_GPU_BLOCKS = GemmBlocks(128, 64, 64, group_m=8, num_warps=8, num_stages=3)
# fc2's backward reloads gate/up tiles and writes three tiles in its epilogue: at 128x128 that
# epilogue took 255 registers and spilled 1,284 B per thread on sm90 (mm1-moe kernels report);
# 128x64 holds it in 252 registers without spilling (triton 3.9's ptxas); compile-checked only.
# Triton 3.6 (the GPU image's) takes 255 and spills 48 B per thread there with the routing-weight
# epilogue (EP=1); 128x32 takes 130-135 registers without spilling under both: the sweep's
# alternative, not adopted unmeasured (it halves the math per dy tile loaded).
FC2_BWD_GPU_BLOCKS = GemmBlocks(128, 64, 64, group_m=8, num_warps=8, num_stages=3)
# Candidates of each, spill-free with triton 3.9 (compiled for sm90 by
# tests/kernels/test_kernel_report.py, timed by benchmarks/bench_tile_sweep.py), the table first. BLOCK_M stays 128: fc1, fc2 and
# fc2's backward share one tile schedule (SwiGLUExpertsFunction).
FC1_GPU_CANDIDATES = (FC1_GPU_BLOCKS, GemmBlocks(128, 64, 64, num_warps=8, num_stages=4),
                      GemmBlocks(128, 64, 32, num_warps=8, num_stages=5))
FC2_BWD_GPU_CANDIDATES = (FC2_BWD_GPU_BLOCKS, GemmBlocks(128, 32, 64, num_warps=8, num_stages=4),
                          GemmBlocks(128, 64, 64, num_warps=8, num_stages=2))


@triton.jit
def _silu_parts(gate):
    """(sigmoid(gate), silu(gate)); exp(-gate) may overflow to inf, giving sigmoid 0 as it must."""
    sig = 1.0 / (1.0 + tl.exp(-gate))
    return sig, gate * sig


@triton.jit
def _swiglu_fc1_kernel(x_ptr, w1_ptr, h_ptr, gu_ptr, gather_ptr, offsets_ptr, tile_expert_ptr,
                       tile_row_ptr, num_tiles_m, D, F,
                       stride_xm, stride_xk, stride_we, stride_wk, stride_wn,
                       stride_hm, stride_hn, stride_gm, stride_gn,
                       GATHER: tl.constexpr, STORE_H: tl.constexpr, STORE_PREACT: tl.constexpr,
                       ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr):
    """One tile of rows x F columns: gate and up accumulate side by side from the same x tile
    (read once), then h = silu(gate) * up; gate_up is stored only when the backward keeps it."""
    pid_m, pid_n = swizzle(tl.program_id(0), num_tiles_m, tl.cdiv(F, BLOCK_N), GROUP_M)
    e, rows, row_ok, rows_c = tile_rows(tile_expert_ptr, tile_row_ptr, offsets_ptr, pid_m,
                                        BLOCK_M)
    if e < 0:
        return
    if GATHER:
        src = tl.load(gather_ptr + rows_c).to(tl.int64)
    else:
        src = rows_c.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < F
    cols_c = (cols % F).to(tl.int64)  # wrapped, not clamped: stays contiguous (see grouped_gemm)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + src[:, None] * stride_xm + ks[None, :] * stride_xk
    wg_ptrs = (w1_ptr + e.to(tl.int64) * stride_we + ks[:, None] * stride_wk
               + cols_c[None, :] * stride_wn)
    wu_ptrs = wg_ptrs + F * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k in range(0, tl.cdiv(D, BLOCK_K)):
        k_ok = ks < D - k * BLOCK_K
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        wg = tl.load(wg_ptrs, mask=k_ok[:, None], other=0.0)
        wu = tl.load(wu_ptrs, mask=k_ok[:, None], other=0.0)
        if UPCAST:
            x = x.to(ACC_DTYPE)
            wg = wg.to(ACC_DTYPE)
            wu = wu.to(ACC_DTYPE)
        acc_g = tl.dot(x, wg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(x, wu, acc_u, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        wg_ptrs += BLOCK_K * stride_wk
        wu_ptrs += BLOCK_K * stride_wk
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    if STORE_H:
        _, silu = _silu_parts(acc_g)
        tl.store(h_ptr + rows64 * stride_hm + cols[None, :] * stride_hn,
                 (silu * acc_u).to(h_ptr.dtype.element_ty), mask=mask)
    if STORE_PREACT:
        g_ptrs = gu_ptr + rows64 * stride_gm + cols[None, :] * stride_gn
        tl.store(g_ptrs, acc_g.to(gu_ptr.dtype.element_ty), mask=mask)
        tl.store(g_ptrs + F * stride_gn, acc_u.to(gu_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_fc2_bwd_kernel(dy_ptr, w2_ptr, gu_ptr, dgu_ptr, h_ptr, part_ptr, scale_ptr,
                           offsets_ptr, tile_expert_ptr, tile_row_ptr, num_tiles_m, D, F,
                           stride_dm, stride_dk, stride_we, stride_wk, stride_wn,
                           stride_gm, stride_gn, stride_qm, stride_qn, stride_hm, stride_hn,
                           HAS_SCALE: tl.constexpr, ACC_DTYPE: tl.constexpr,
                           UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr):
    """One tile of rows x F columns of g = dy @ w2[e]^T (w2 passed with transposed strides),
    then the SwiGLU backward on it: writes d_gate_up (dgu), the recomputed h, and the partial
    rowdot(h, g) of this column tile (the row-scale grad)."""
    num_tiles_n = tl.cdiv(F, BLOCK_N)
    pid_m, pid_n = swizzle(tl.program_id(0), num_tiles_m, num_tiles_n, GROUP_M)
    e, rows, row_ok, rows_c = tile_rows(tile_expert_ptr, tile_row_ptr, offsets_ptr, pid_m,
                                        BLOCK_M)
    if e < 0:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < F
    cols_c = cols % F
    g = mm_mainloop(dy_ptr, w2_ptr, rows_c.to(tl.int64), e, cols_c, D, stride_dm, stride_dk,
                    stride_we, stride_wk, stride_wn, ACC_DTYPE, UPCAST, PRECISION, BLOCK_M,
                    BLOCK_N, BLOCK_K)
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    gate_ptrs = gu_ptr + rows64 * stride_gm + cols[None, :] * stride_gn
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
    up = tl.load(gate_ptrs + F * stride_gn, mask=mask, other=0.0).to(ACC_DTYPE)
    sig, silu = _silu_parts(gate)
    h = silu * up
    tl.store(h_ptr + rows64 * stride_hm + cols[None, :] * stride_hn,
             h.to(h_ptr.dtype.element_ty), mask=mask)
    if HAS_SCALE:
        tl.store(part_ptr + rows * num_tiles_n + pid_n, tl.sum(h * g, axis=1), mask=row_ok)
        g = g * tl.load(scale_ptr + rows_c).to(ACC_DTYPE)[:, None]
    d_gate = g * up * sig * (1.0 + gate * (1.0 - sig))
    dgate_ptrs = dgu_ptr + rows64 * stride_qm + cols[None, :] * stride_qn
    tl.store(dgate_ptrs, d_gate.to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(dgate_ptrs + F * stride_qn, (g * silu).to(dgu_ptr.dtype.element_ty), mask=mask)


def _fc1_blocks(n_rows, D, F, blocks):
    return pick_blocks(n_rows, D, F, blocks, gpu=FC1_GPU_BLOCKS)


def swiglu_fc1_fwd(x: torch.Tensor, w1_EDF2: torch.Tensor, offsets_E1: torch.Tensor,
                   gather_index_N: Optional[torch.Tensor] = None, *, store_h: bool = True,
                   store_preact: bool = False, schedule: Optional[TileSchedule] = None,
                   blocks: Optional[GemmBlocks] = None
                   ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(h_NF = silu(gate) * up, gate_up_NF2) with [gate | up] = x[src(n)] @ w1_EDF2[e(n)];
    each output only when asked for (None otherwise). x is x_ND, or x_TD with a gather."""
    n_rows = check_grouped(x, w1_EDF2, offsets_E1, gather_index_N, None)
    D, F2 = w1_EDF2.shape[1], w1_EDF2.shape[2]
    if F2 % 2:
        raise ValueError(f"w1_EDF2 last dim {F2} is not 2F ([gate | up])")
    F = F2 // 2
    blocks = _fc1_blocks(n_rows, D, F, blocks)
    if schedule is None:
        schedule = tile_schedule(offsets_E1, n_rows, blocks.block_m)
    assert schedule.block_m == blocks.block_m, "the tile schedule was built for another BLOCK_M"
    h = torch.empty(n_rows, F, device=x.device, dtype=x.dtype) if store_h else None
    gu = torch.empty(n_rows, F2, device=x.device, dtype=x.dtype) if store_preact else None
    if n_rows == 0 or F == 0 or not (store_h or store_preact):
        return h, gu
    dt = kernel_dtypes(x.dtype)
    dummy = offsets_E1
    hh = h if h is not None else dummy.view(1, -1)
    gg = gu if gu is not None else dummy.view(1, -1)
    _swiglu_fc1_kernel[(schedule.num_tiles * triton.cdiv(F, blocks.block_n),)](
        x, w1_EDF2, hh, gg, gather_index_N if gather_index_N is not None else dummy, offsets_E1,
        schedule.tile_expert, schedule.tile_row, schedule.num_tiles, D, F,
        x.stride(0), x.stride(1), w1_EDF2.stride(0), w1_EDF2.stride(1), w1_EDF2.stride(2),
        hh.stride(0), hh.stride(1), gg.stride(0), gg.stride(1),
        GATHER=gather_index_N is not None, STORE_H=store_h, STORE_PREACT=store_preact,
        ACC_DTYPE=dt.acc, UPCAST=dt.upcast, PRECISION=dt.precision, BLOCK_M=blocks.block_m,
        BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k, GROUP_M=blocks.group_m,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    return h, gu


def swiglu_fc2_bwd(dy_ND: torch.Tensor, w2_EFD: torch.Tensor, gate_up_NF2: torch.Tensor,
                   offsets_E1: torch.Tensor, row_scale_N: Optional[torch.Tensor] = None, *,
                   schedule: Optional[TileSchedule] = None, blocks: Optional[GemmBlocks] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Backward through fc2 and the SwiGLU: (d_gate_up_NF2, h_NF recomputed from gate_up,
    grad_row_scale_N or None)."""
    w2_EDF = w2_EFD.transpose(1, 2)
    n_rows = check_grouped(dy_ND, w2_EDF, offsets_E1, None, row_scale_N)
    D, F = w2_EDF.shape[1], w2_EDF.shape[2]
    blocks = pick_blocks(n_rows, D, F, blocks, gpu=FC2_BWD_GPU_BLOCKS)
    if schedule is None:
        schedule = tile_schedule(offsets_E1, n_rows, blocks.block_m)
    assert schedule.block_m == blocks.block_m, "the tile schedule was built for another BLOCK_M"
    dgu = torch.empty(n_rows, 2 * F, device=dy_ND.device, dtype=gate_up_NF2.dtype)
    h = torch.empty(n_rows, F, device=dy_ND.device, dtype=gate_up_NF2.dtype)
    tiles_n = triton.cdiv(F, blocks.block_n)
    dt = kernel_dtypes(dy_ND.dtype)
    part = None
    if row_scale_N is not None:
        part = torch.zeros(n_rows, tiles_n, device=dy_ND.device, dtype=acc_dtype(dy_ND.dtype))
    if n_rows and F:
        dummy = offsets_E1
        _swiglu_fc2_bwd_kernel[(schedule.num_tiles * tiles_n,)](
            dy_ND, w2_EDF, gate_up_NF2, dgu, h, part if part is not None else dummy,
            row_scale_N if row_scale_N is not None else dummy, offsets_E1, schedule.tile_expert,
            schedule.tile_row, schedule.num_tiles, D, F, dy_ND.stride(0), dy_ND.stride(1),
            w2_EDF.stride(0), w2_EDF.stride(1), w2_EDF.stride(2), gate_up_NF2.stride(0),
            gate_up_NF2.stride(1), dgu.stride(0), dgu.stride(1), h.stride(0), h.stride(1),
            HAS_SCALE=row_scale_N is not None, ACC_DTYPE=dt.acc, UPCAST=dt.upcast,
            PRECISION=dt.precision, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
            BLOCK_K=blocks.block_k, GROUP_M=blocks.group_m, num_warps=blocks.num_warps,
            num_stages=blocks.num_stages)
    grad_scale = part.sum(1).to(row_scale_N.dtype) if part is not None else None
    return dgu, h, grad_scale


class SwiGLUExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1_EDF2, w2_EFD, offsets_E1, gather_index_N, row_scale_N, blocks,
                recompute_fc1):
        if w2_EFD.shape[1] * 2 != w1_EDF2.shape[2] or w2_EFD.shape[2] != w1_EDF2.shape[1]:
            raise ValueError(f"w1_EDF2 {tuple(w1_EDF2.shape)} and w2_EFD {tuple(w2_EFD.shape)} "
                             "disagree on D or F")
        n_rows = check_grouped(x, w1_EDF2, offsets_E1, gather_index_N, row_scale_N)
        # Every kernel of the call shares one tile schedule: their BLOCK_M agree (128 on GPU).
        block_m = _fc1_blocks(n_rows, x.shape[1], w2_EFD.shape[1], blocks).block_m
        schedule = tile_schedule(offsets_E1, n_rows, block_m)
        keep = any(ctx.needs_input_grad) and not recompute_fc1
        h, gu = swiglu_fc1_fwd(x, w1_EDF2, offsets_E1, gather_index_N, store_preact=keep,
                               schedule=schedule, blocks=blocks)
        y = grouped_mm_fwd(h, w2_EFD, offsets_E1, None, row_scale_N, schedule=schedule,
                           blocks=blocks)
        ctx.save_for_backward(x, w1_EDF2, w2_EFD, offsets_E1, gather_index_N, row_scale_N, gu)
        ctx.schedule, ctx.blocks = schedule, blocks
        return y

    @staticmethod
    def backward(ctx, dy_ND):
        x, w1_EDF2, w2_EFD, offsets_E1, gather_index_N, row_scale_N, gu = ctx.saved_tensors
        need_x, need_w1, need_w2, _, _, need_s, _, _ = ctx.needs_input_grad
        sched, blocks = ctx.schedule, ctx.blocks
        if gu is None:  # recompute_fc1: rerun fc1 for the pre-activations only
            _, gu = swiglu_fc1_fwd(x, w1_EDF2, offsets_E1, gather_index_N, store_h=False,
                                   store_preact=True, schedule=sched, blocks=blocks)
        dgu, h, ds = swiglu_fc2_bwd(dy_ND, w2_EFD, gu, offsets_E1, row_scale_N,
                                    schedule=sched, blocks=blocks)
        del gu
        dw2 = grouped_mm_dw(h, dy_ND, offsets_E1, None, row_scale_N, blocks=blocks) if need_w2 \
            else None
        del h
        dw1 = dx = None
        if need_w1:
            dw1 = grouped_mm_dw(x, dgu, offsets_E1, gather_index_N, blocks=blocks)
        if need_x:
            dx = grouped_mm_fwd(dgu, w1_EDF2.transpose(1, 2), offsets_E1, schedule=sched,
                                blocks=blocks)
            if gather_index_N is not None:
                dx = gather_rows_backward(dx, gather_index_N, x.shape[0])
        return dx, dw1, dw2, None, None, (ds if need_s else None), None, None


def swiglu_experts(x: torch.Tensor, w1_EDF2: torch.Tensor, w2_EFD: torch.Tensor,
                   offsets_E1: torch.Tensor, gather_index_N: Optional[torch.Tensor] = None,
                   row_scale_N: Optional[torch.Tensor] = None, *, recompute_fc1: bool = False,
                   blocks: Optional[GemmBlocks] = None) -> torch.Tensor:
    """The SwiGLU expert MLP over expert-sorted rows, differentiable in x, w1, w2 and
    row_scale_N: y_ND[n] = (silu(x[src] w1_gate) * (x[src] w1_up)) @ w2[e(n)] * row_scale_N[n].
    x is x_ND (src(n) = n), or x_TD with src(n) = gather_index_N[n] (its grad then sums each
    token's rows deterministically). ``recompute_fc1`` reruns fc1 in the backward instead of
    saving gate_up (see the module docstring); ``blocks`` overrides every kernel's tiles."""
    offsets_E1, gather_index_N, row_scale_N = contiguous_routing(offsets_E1, gather_index_N,
                                                                 row_scale_N)
    return SwiGLUExpertsFunction.apply(x, w1_EDF2, w2_EFD, offsets_E1, gather_index_N,
                                       row_scale_N, blocks, recompute_fc1)
