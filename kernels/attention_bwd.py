"""Flash attention backward: delta preprocess, dK/dV and dQ kernels, and their launcher.

Shape legend (as ``attention.py``): B batch, S sequence length, Hq query heads, Hkv key/value
heads, GROUP = Hq // Hkv, Dh head dim (BD = next_pow2(Dh)); BM / BN query / key rows per tile.

With p_ij = exp(s_ij - lse_i), s = scale * q k^T, and delta_i = rowsum(dO * O)_i - dlse_i:
  dV = p^T dO,   dp = dO V^T,   ds = p * (dp - delta),   dQ = scale * ds K,   dK = scale * ds^T Q.
(A gradient reaching lse adds dlse_i * p_ij to ds_ij, hence the - dlse_i in delta.)

Layers: ``_attn_bwd_preprocess_kernel``, ``_attn_bwd_dkdv_kernel``, ``_attn_bwd_dq_kernel`` ->
``attention_bwd`` (called by ``attention.FlashAttentionFunction.backward``).

Design notes:
- Two kernels, no atomics: dK/dV iterates query tiles per key tile, dQ iterates key tiles per
  query tile (p and dp are recomputed in both: 7 matmuls against 5 with atomic dQ, in exchange
  for deterministic gradients, as Triton tutorial 06).
- GQA: one dK/dV program owns a key tile of one kv head and loops over the GROUP query heads
  that read it, accumulating in registers: deterministic, no float atomics, no [B, S, Hq, Dh]
  expanded dK/dV buffer.
- Tile ranges and masks as the forward (``tile_spans``): only the tiles of the documents and
  the causal band are visited; the element mask runs on the diagonal, document-edge and
  sequence-end tiles only.
- Masked probabilities are 0 exactly (exp2(-inf)); lse is finite for every valid query.

Caution: tested in the Triton interpreter (CPU) and compiled for sm90/sm80 with bf16 inputs;
not yet run or timed on a GPU.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, kernel_dtypes, next_pow2
from .attention_tiles import (LOG2E, AttentionBlocks, attend, bsh_strides, dense_last, doc_span,
                              doc_tile_ranges, load_tile, tile_spans)

# Rows per program of the delta preprocess (memory bound: one [rows, BD] tile of O and dO).
PREPROCESS_ROWS = 64


@triton.jit
def _attn_bwd_preprocess_kernel(o_ptr, do_ptr, dlse_ptr, delta_ptr,
                                stride_ob, stride_os, stride_oh, stride_db, stride_ds, stride_dh,
                                S, Dh, Hq, HAS_DLSE: tl.constexpr, ACC_DTYPE: tl.constexpr,
                                BS: tl.constexpr, BD: tl.constexpr):
    """delta_BHS = rowsum(dO * O) - dlse."""
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    rows = tl.program_id(0) * BS + tl.arange(0, BS)
    offs_d = tl.arange(0, BD)
    mask = (rows[:, None] < S) & (offs_d[None, :] < Dh)
    o = tl.load(o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + rows[:, None] * stride_os
                + offs_d[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
    do = tl.load(do_ptr + b.to(tl.int64) * stride_db + h * stride_dh + rows[:, None] * stride_ds
                 + offs_d[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
    delta = tl.sum(o * do, axis=1)
    if HAS_DLSE:
        delta -= tl.load(dlse_ptr + bh.to(tl.int64) * S + rows, mask=rows < S, other=0.0)
    tl.store(delta_ptr + bh.to(tl.int64) * S + rows, delta, mask=rows < S)


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos,
                rows_n, doc_n, docs_ptr, start, full_lo, full_hi, stop, qk_scale, S, Dh, offs_m,
                offs_d, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, PAD_D: tl.constexpr,
                UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                BM: tl.constexpr):
    """Accumulate dK, dV of one key tile over the query tiles [start, stop) of one head (those
    outside [full_lo, full_hi) masked). Works transposed ([BN, BM] tiles) so that dK and dV
    come out as [BN, BD] with no transposes of the accumulators."""
    for start_m in range(start, stop, BM):
        rows_m = start_m + offs_m
        q = load_tile(q_base + rows_m[:, None] * stride_qs + offs_d[None, :], rows_m, S, offs_d,
                      Dh, PAD_D, UPCAST, ACC_DTYPE)
        # lse is saved in natural log; the kernels work in log2 units (exp2 is the fast one).
        lse2 = tl.load(lse_base + rows_m, mask=rows_m < S, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + rows_m, mask=rows_m < S, other=0.0)
        s2T = tl.dot(k, tl.trans(q), input_precision=PRECISION).to(ACC_DTYPE) * qk_scale
        pT = tl.exp2(s2T - lse2[None, :])
        if (start_m < full_lo) | (start_m >= full_hi):  # uniform per program: no divergence
            okT = rows_m[None, :] < S  # keys past S are never stored: no need to mask them
            if CAUSAL:
                okT = okT & (rows_m[None, :] >= rows_n[:, None])
            if HAS_DOCS:
                doc_m = tl.load(docs_ptr + rows_m, mask=rows_m < S, other=-2)
                okT = okT & (doc_n[:, None] == doc_m[None, :])
            pT = tl.where(okT, pT, 0.0)
        do = load_tile(do_base + rows_m[:, None] * stride_dos + offs_d[None, :], rows_m, S,
                       offs_d, Dh, PAD_D, UPCAST, ACC_DTYPE)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION).to(ACC_DTYPE)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                          docs_ptr, ranges_ptr,
                          stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                          stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                          stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
                          S, Dh, Hq, Hkv, GROUP, qk_scale, sm_scale,
                          CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, PAD_D: tl.constexpr,
                          UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    hk = bh % Hkv
    a = pid * BN
    rows_n = a + tl.arange(0, BN)
    offs_m = tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    docs_b = docs_ptr + b.to(tl.int64) * S
    k = load_tile(k_ptr + b.to(tl.int64) * stride_kb + hk * stride_kh
                  + rows_n[:, None] * stride_ks + offs_d[None, :], rows_n, S, offs_d, Dh,
                  PAD_D, UPCAST, ACC_DTYPE)
    v = load_tile(v_ptr + b.to(tl.int64) * stride_vb + hk * stride_vh
                  + rows_n[:, None] * stride_vs + offs_d[None, :], rows_n, S, offs_d, Dh,
                  PAD_D, UPCAST, ACC_DTYPE)
    doc_n = rows_n
    if HAS_DOCS:
        doc_n = tl.load(docs_b + rows_n, mask=rows_n < S, other=-3)
    lo, hi, single = doc_span(ranges_ptr, b, pid, S, HAS_DOCS)
    lo_blk, full_lo, full_hi, end = tile_spans(a, lo, hi, single, BN, BM, CAUSAL, False)

    dk = tl.zeros([BN, BD], ACC_DTYPE)
    dv = tl.zeros([BN, BD], ACC_DTYPE)
    for g in range(GROUP):  # the query heads of this kv head, in order: deterministic sums
        h = hk * GROUP + g
        q_base = q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh
        do_base = do_ptr + b.to(tl.int64) * stride_dob + h * stride_doh
        lse_base = lse_ptr + (b * Hq + h).to(tl.int64) * S
        delta_base = delta_ptr + (b * Hq + h).to(tl.int64) * S
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs,
                             stride_dos, rows_n, doc_n, docs_b, lo_blk, full_lo, full_hi, end,
                             qk_scale, S, Dh, offs_m, offs_d, CAUSAL, HAS_DOCS, PAD_D, UPCAST,
                             ACC_DTYPE, PRECISION, BM)

    mask = (rows_n[:, None] < S) & (offs_d[None, :] < Dh)
    dk_ptrs = dk_ptr + b.to(tl.int64) * stride_dkb + hk * stride_dkh + rows_n[:, None] * stride_dks
    dv_ptrs = dv_ptr + b.to(tl.int64) * stride_dvb + hk * stride_dvh + rows_n[:, None] * stride_dvs
    tl.store(dk_ptrs + offs_d[None, :], (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptrs + offs_d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, rows_m, doc_m,
              docs_ptr, start, full_lo, full_hi, stop, qk_scale, S, Dh, offs_n, offs_d,
              CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, PAD_D: tl.constexpr,
              UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
              BN: tl.constexpr):
    """Accumulate dQ of one query tile over the key tiles [start, stop) (those outside
    [full_lo, full_hi) masked)."""
    for start_n in range(start, stop, BN):
        rows_n = start_n + offs_n
        k = load_tile(k_base + rows_n[:, None] * stride_ks + offs_d[None, :], rows_n, S, offs_d,
                      Dh, PAD_D, UPCAST, ACC_DTYPE)
        v = load_tile(v_base + rows_n[:, None] * stride_vs + offs_d[None, :], rows_n, S, offs_d,
                      Dh, PAD_D, UPCAST, ACC_DTYPE)
        s2 = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(ACC_DTYPE) * qk_scale
        p = tl.exp2(s2 - lse2[:, None])
        if (start_n < full_lo) | (start_n >= full_hi):  # uniform per program: no divergence
            p = tl.where(attend(rows_m, rows_n, S, doc_m, docs_ptr, CAUSAL, HAS_DOCS), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION).to(ACC_DTYPE)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, docs_ptr,
                        ranges_ptr,
                        stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                        stride_vb, stride_vs, stride_vh, stride_dob, stride_dos, stride_doh,
                        stride_dqb, stride_dqs, stride_dqh,
                        S, Dh, Hq, GROUP, qk_scale, sm_scale,
                        CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, PAD_D: tl.constexpr,
                        UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    if CAUSAL:  # the last query tiles have the most keys: launch them first
        pid = tl.num_programs(0) - 1 - tl.program_id(0)
    else:
        pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    a = pid * BM
    rows_m = a + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    docs_b = docs_ptr + b.to(tl.int64) * S
    q = load_tile(q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh
                  + rows_m[:, None] * stride_qs + offs_d[None, :], rows_m, S, offs_d, Dh,
                  PAD_D, UPCAST, ACC_DTYPE)
    do = load_tile(do_ptr + b.to(tl.int64) * stride_dob + h * stride_doh
                   + rows_m[:, None] * stride_dos + offs_d[None, :], rows_m, S, offs_d, Dh,
                   PAD_D, UPCAST, ACC_DTYPE)
    lse2 = tl.load(lse_ptr + bh.to(tl.int64) * S + rows_m, mask=rows_m < S, other=0.0)
    lse2 = lse2 * 1.4426950408889634  # natural log -> log2 units
    delta = tl.load(delta_ptr + bh.to(tl.int64) * S + rows_m, mask=rows_m < S, other=0.0)
    doc_m = rows_m
    if HAS_DOCS:
        doc_m = tl.load(docs_b + rows_m, mask=rows_m < S, other=-2)
    lo, hi, single = doc_span(ranges_ptr, b, pid, S, HAS_DOCS)
    lo_blk, full_lo, full_hi, end = tile_spans(a, lo, hi, single, BM, BN, CAUSAL, True)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + hk * stride_vh

    dq = tl.zeros([BM, BD], ACC_DTYPE)
    dq = _dq_tiles(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, rows_m, doc_m,
                   docs_b, lo_blk, full_lo, full_hi, end, qk_scale, S, Dh, offs_n, offs_d, CAUSAL,
                   HAS_DOCS, PAD_D, UPCAST, ACC_DTYPE, PRECISION, BN)

    mask = (rows_m[:, None] < S) & (offs_d[None, :] < Dh)
    dq_ptrs = dq_ptr + b.to(tl.int64) * stride_dqb + h * stride_dqh + rows_m[:, None] * stride_dqs
    tl.store(dq_ptrs + offs_d[None, :], (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=mask)


def attention_bwd(grad_o_BSHD: torch.Tensor, grad_lse_BHS: Optional[torch.Tensor],
                  q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor,
                  o_BSHD: torch.Tensor, lse_BHS: torch.Tensor, causal: bool,
                  softmax_scale: float, doc_ids_BS: Optional[torch.Tensor],
                  blocks: AttentionBlocks) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward launcher: (dq, dk, dv) in the dtypes and memory layouts of q, k, v, from the
    output gradient (and optionally the lse gradient) and the forward's saved o and lse."""
    B, S, Hq, Dh = q_BSHD.shape
    Hkv = k_BSHD.shape[2]
    grad_o_BSHD = dense_last(grad_o_BSHD)
    dq, dk, dv = (torch.empty_like(t) for t in (q_BSHD, k_BSHD, v_BSHD))
    if B * S * Hq == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    bd = next_pow2(max(Dh, 16))
    dt, pad_d = kernel_dtypes(q_BSHD.dtype), bd != Dh
    has_docs = doc_ids_BS is not None
    has_dlse = grad_lse_BHS is not None
    delta_BHS = torch.empty(B, Hq, S, dtype=acc_dtype(q_BSHD.dtype), device=q_BSHD.device)
    _attn_bwd_preprocess_kernel[(triton.cdiv(S, PREPROCESS_ROWS), B * Hq)](
        o_BSHD, grad_o_BSHD, grad_lse_BHS.contiguous() if has_dlse else delta_BHS, delta_BHS,
        *bsh_strides(o_BSHD), *bsh_strides(grad_o_BSHD), S, Dh, Hq,
        HAS_DLSE=has_dlse, ACC_DTYPE=dt.acc, BS=PREPROCESS_ROWS, BD=bd)

    common = dict(CAUSAL=causal, HAS_DOCS=has_docs, PAD_D=pad_d, UPCAST=dt.upcast,
                  ACC_DTYPE=dt.acc, PRECISION=dt.precision, BD=bd,
                  num_warps=blocks.bwd_warps, num_stages=blocks.bwd_stages)
    docs = doc_ids_BS if has_docs else delta_BHS
    qk_scale = softmax_scale * LOG2E
    bm, bn = blocks.dkdv_m, blocks.dkdv_n
    _attn_bwd_dkdv_kernel[(triton.cdiv(S, bn), B * Hkv)](
        q_BSHD, k_BSHD, v_BSHD, grad_o_BSHD, lse_BHS, delta_BHS, dk, dv, docs,
        doc_tile_ranges(doc_ids_BS, bn) if has_docs else delta_BHS,
        *bsh_strides(q_BSHD), *bsh_strides(k_BSHD), *bsh_strides(v_BSHD),
        *bsh_strides(grad_o_BSHD), *bsh_strides(dk), *bsh_strides(dv),
        S, Dh, Hq, Hkv, Hq // Hkv, qk_scale, softmax_scale,
        BM=bm, BN=bn, **common)
    bm, bn = blocks.dq_m, blocks.dq_n
    _attn_bwd_dq_kernel[(triton.cdiv(S, bm), B * Hq)](
        q_BSHD, k_BSHD, v_BSHD, grad_o_BSHD, lse_BHS, delta_BHS, dq, docs,
        doc_tile_ranges(doc_ids_BS, bm) if has_docs else delta_BHS,
        *bsh_strides(q_BSHD), *bsh_strides(k_BSHD), *bsh_strides(v_BSHD),
        *bsh_strides(grad_o_BSHD), *bsh_strides(dq), S, Dh, Hq, Hq // Hkv, qk_scale, softmax_scale,
        BM=bm, BN=bn, **common)
    return dq, dk, dv
