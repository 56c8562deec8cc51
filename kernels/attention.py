"""Flash attention for both towers: causal (decoder), bidirectional (ViT) and document-masked
(packed MM1 sequences), with grouped-query attention. Forward here; backward kernels in
``attention_bwd.py``; the jit and host helpers both use in ``attention_tiles.py``.

Shape legend: B batch (sequences), S sequence length, Hq query heads, Hkv key/value heads
(GROUP = Hq // Hkv query heads share one kv head: query head h reads kv head h // GROUP),
Dh head dim (BD = next_pow2(Dh) in the kernels), T packed tokens (varlen API).
BM / BN: query / key rows per tile.

Semantics are those of ``kernels/reference/attention.py``: query i attends key j iff
(not causal or j <= i) and doc[i] == doc[j]; lse_BHS is the natural-log logsumexp of the scaled
scores, saved for the backward.

Layers: ``_attn_fwd_kernel`` -> ``attention_fwd`` (backward: ``attention_bwd.py``) ->
``FlashAttentionFunction`` -> ``flash_attention(...)`` / ``flash_attention_varlen(...)``.

Design notes:
- Layout [B, S, H, Dh] as flash-attn's, with any strides as long as Dh is contiguous: Megatron's
  [S, B, H, Dh] tensors pass in as permuted views, with no copy, and outputs keep their layout.
- Head dims that are not powers of two (ViT-H: 80) are padded to BD = next_pow2(Dh) = 128 with
  masked loads (zeros add nothing to the dots). The alternative, splitting 80 = 64 + 16 into two
  dots per matmul, saves the 37.5% padded MMA work but doubles the kernel code in the forward and
  three backward kernels; padding first, the split when a GPU profile says it matters.
- Documents: ``doc_ids_BS`` must be non-decreasing along each sequence (packing writes
  documents one after another; the varlen API's cu_seqlens always are). The host finds, per
  tile, the key range [first token of the tile's first document, last token of its last
  document) by searchsorted (no sync), and the kernels loop over those tiles only; causal adds
  the diagonal bound. Whole tiles outside are never read (tested by planting NaN there).
- One pipelined loop per program; a tile-uniform branch applies the element mask only on the
  tiles that need it (diagonal, document edges, sequence end). Against Triton tutorial 06's
  separate masked and unmasked loops: no pipeline drain and refill between them, a third of
  the code, half the compile time (1.9 s against 4.1 s for the sm90 forward, measured here).
- Masked scores are set to -1e6 (log2 units) rather than -inf in the forward: a row whose
  keys in one tile are all masked then stays finite (no inf - inf = NaN in the rescale); its
  garbage is wiped by the rescale exp2(-1e6 - m) = 0 once a real key arrives, and every valid
  query has one (itself).
- Math in fp32 (fp64 for fp64 inputs, for gradcheck). On GPU the dots take the input dtype
  (bf16) with fp32 accumulation; in the interpreter (UPCAST) tiles are upcast right after the
  load, since it computes bf16 dots wrongly.

Caution: tested in the Triton interpreter (CPU) and compiled for sm90/sm80 with bf16 inputs;
not yet run or timed on a GPU, and the GPU tile sizes below are not yet tuned.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, check_device, kernel_dtypes, next_pow2, use_interpreter_tiles
from .attention_bwd import attention_bwd
from .attention_tiles import (LOG2E, AttentionBlocks, attend, bsh_strides, dense_last, doc_span,
                              doc_tile_ranges, load_tile, tile_spans)

# Interpreter: each tl op is one numpy call over a tile, so few large tiles win (64 keeps the
# test suite's S=1025 cases at ~17 tiles per axis).
INTERPRET_BLOCKS = AttentionBlocks(64, 64, 64, 64, 64, 64)


def gpu_blocks(Dh: int, capability: int = 90) -> AttentionBlocks:
    """GPU tiles, after Triton tutorial 06 (fwd 128x128; bwd 32x128 for dK/dV, 128x32 for dQ,
    5 stages on Hopper, with 8 warps in the backward: no spills, see below). Not yet tuned on
    a GPU here: run ``benchmarks/bench_tile_sweep.py`` (or ``bench_attention.py --sweep``) on
    the card and update. Shared memory per block, bf16, 16-divisible strides (so the K/V loads
    are cp.async-pipelined), from the compile test: sm90 Dh=128 fwd 229,376 B (limit 232,448:
    3 stages is the most), dK/dV 148,992, dQ 147,968; sm80 Dh=128 fwd 114,688, dK/dV 99,328,
    dQ 98,816."""
    bd = next_pow2(max(Dh, 16))
    if capability >= 90:
        # bwd at 8 warps: at 4 the dK/dV kernel took 255 registers and spilled 1.6-1.8 KB per
        # thread, dQ 68 B (mm1-moe kernels report, sm90); 8 warps split the accumulators
        return AttentionBlocks(128, 128, 32, 128, 128, 32, fwd_warps=4 if bd <= 64 else 8,
                               fwd_stages=3, bwd_warps=8, bwd_stages=5)
    return AttentionBlocks(128, 64, 32, 128, 128, 32, fwd_warps=4, fwd_stages=3,
                           bwd_warps=4, bwd_stages=3)


# sm90 candidates (timed by benchmarks/bench_tile_sweep.py; each compiles spill-free within
# shared memory, tests/kernels/test_kernel_report.py). Forward (BM, BN, warps, stages): the
# table's 128x128 at 3 stages uses 224 of 227 KiB of shared memory (one compiler release adding
# a buffer away from failing to launch) at 248-252 registers; 2 stages free 64 KiB (160 KiB),
# and 128x64 halves the score tile (128 KiB, 190-242 registers). Backward (dK/dV BM, BN, dQ BM,
# BN, warps, stages): 64x64 at 8 warps (dK/dV 215-226 registers, 137 KiB), and 4 warps at half
# the tiles (2 CTAs per SM, 80 KiB); 64x128 / 128x64 at 8 warps spilled 76-212 B (not listed).
FWD_CANDIDATES_SM90 = ((128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3))
BWD_CANDIDATES_SM90 = ((32, 128, 128, 32, 8, 5), (64, 64, 64, 64, 8, 3), (32, 64, 64, 32, 4, 3))


def gpu_candidates(Dh: int, part: str, capability: int = 90) -> Tuple[AttentionBlocks, ...]:
    """``gpu_blocks(Dh, capability)`` first, then its variants in the forward (``part="fwd"``)
    or the backward (``"bwd"``) tiles, the other part kept; sm90 only (sm80: the table)."""
    base = gpu_blocks(Dh, capability)
    out = [base]
    if capability >= 90:
        for c in (FWD_CANDIDATES_SM90 if part == "fwd" else BWD_CANDIDATES_SM90):
            cand = (dataclasses.replace(base, fwd_m=c[0], fwd_n=c[1], fwd_warps=c[2],
                                        fwd_stages=c[3]) if part == "fwd" else
                    dataclasses.replace(base, dkdv_m=c[0], dkdv_n=c[1], dq_m=c[2], dq_n=c[3],
                                        bwd_warps=c[4], bwd_stages=c[5]))
            if cand not in out:
                out.append(cand)
    return tuple(out)


# fp32 / fp64 inputs on a GPU (tests only; production is bf16): tiles sized for 2-byte elements
# would overflow shared memory. Compiled here: fp32 fwd 114,944 B, dK/dV 106,752, dQ 106,496 on
# sm90 and sm80; fp64 at most 118,784.
GPU_FP32_BLOCKS = AttentionBlocks(64, 64, 32, 64, 64, 32, 4, 2, 4, 2)
GPU_FP64_BLOCKS = AttentionBlocks(32, 32, 16, 32, 32, 16, 4, 1, 4, 1)


def default_blocks(Dh: int, device: torch.device, dtype: torch.dtype) -> AttentionBlocks:
    if use_interpreter_tiles():
        return INTERPRET_BLOCKS
    if dtype == torch.float64:
        return GPU_FP64_BLOCKS
    if dtype == torch.float32:
        return GPU_FP32_BLOCKS
    major = torch.cuda.get_device_capability(device)[0]
    return gpu_blocks(Dh, 90 if major >= 9 else 80)


# ----------------------------------------------------------------------------- forward kernel


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, rows_m, doc_m, docs_ptr,
               start, full_lo, full_hi, stop, qk_scale, S, Dh, offs_n, offs_d,
               CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, PAD_D: tl.constexpr,
               UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
               BN: tl.constexpr):
    """Online softmax over the key tiles [start, stop); those outside [full_lo, full_hi) masked."""
    for start_n in range(start, stop, BN):
        rows_n = start_n + offs_n
        k = load_tile(k_base + rows_n[:, None] * stride_ks + offs_d[None, :], rows_n, S, offs_d,
                      Dh, PAD_D, UPCAST, ACC_DTYPE)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(ACC_DTYPE) * qk_scale
        if (start_n < full_lo) | (start_n >= full_hi):  # uniform per program: no divergence
            qk = tl.where(attend(rows_m, rows_n, S, doc_m, docs_ptr, CAUSAL, HAS_DOCS), qk,
                          -1.0e6)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tile(v_base + rows_n[:, None] * stride_vs + offs_d[None, :], rows_n, S, offs_d,
                      Dh, PAD_D, UPCAST, ACC_DTYPE)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, docs_ptr, ranges_ptr,
                     stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                     S, Dh, Hq, GROUP, qk_scale,
                     CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr, PAD_D: tl.constexpr,
                     UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
    # Causal: the last query tiles have the most keys; launch them first for a better tail.
    if CAUSAL:
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
    q_base = q_ptr + b.to(tl.int64) * stride_qb + h * stride_qh
    k_base = k_ptr + b.to(tl.int64) * stride_kb + hk * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + hk * stride_vh
    docs_b = docs_ptr + b.to(tl.int64) * S

    q = load_tile(q_base + rows_m[:, None] * stride_qs + offs_d[None, :], rows_m, S, offs_d, Dh,
                  PAD_D, UPCAST, ACC_DTYPE)
    doc_m = rows_m
    if HAS_DOCS:
        doc_m = tl.load(docs_b + rows_m, mask=rows_m < S, other=-2)
    lo, hi, single = doc_span(ranges_ptr, b, pid, S, HAS_DOCS)
    lo_blk, full_lo, full_hi, end = tile_spans(a, lo, hi, single, BM, BN, CAUSAL, True)

    m_i = tl.full([BM], float("-inf"), ACC_DTYPE)
    l_i = tl.zeros([BM], ACC_DTYPE)
    acc = tl.zeros([BM, BD], ACC_DTYPE)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, rows_m,
                               doc_m, docs_b, lo_blk, full_lo, full_hi, end, qk_scale, S, Dh,
                               offs_n, offs_d, CAUSAL, HAS_DOCS, PAD_D, UPCAST, ACC_DTYPE,
                               PRECISION, BN)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # only rows past S (never stored) can have no key
    o = acc / l_i[:, None]
    row_ok = rows_m < S
    o_ptrs = o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + rows_m[:, None] * stride_os
    if PAD_D:
        tl.store(o_ptrs + offs_d[None, :], o.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_d[None, :] < Dh))
    else:
        tl.store(o_ptrs + offs_d[None, :], o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # log2 units -> natural log
    tl.store(lse_ptr + bh.to(tl.int64) * S + rows_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------- host side


def check_doc_ids(doc_ids_BS: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """Validate shape and dtype (host) and order (on the device, without a sync)."""
    if tuple(doc_ids_BS.shape) != (B, S) or doc_ids_BS.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"doc_ids_BS must be int32/int64 of shape ({B}, {S}), got "
                         f"{doc_ids_BS.dtype} {tuple(doc_ids_BS.shape)}")
    doc_ids_BS = doc_ids_BS.to(torch.int32).contiguous()
    if S > 1:
        torch._assert_async((doc_ids_BS[:, 1:] >= doc_ids_BS[:, :-1]).all(),
                            "doc_ids_BS must be non-decreasing along each sequence (packed "
                            "documents are contiguous)")
    return doc_ids_BS


def attention_fwd(q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor,
                  causal: bool, softmax_scale: float, doc_ids_BS: Optional[torch.Tensor],
                  blocks: AttentionBlocks) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward launcher on validated inputs (doc ids int32, non-decreasing). Returns o_BSHD
    (input dtype, q's memory layout) and lse_BHS (fp32; fp64 for fp64 inputs)."""
    B, S, Hq, Dh = q_BSHD.shape
    Hkv = k_BSHD.shape[2]
    q_BSHD, k_BSHD, v_BSHD = (dense_last(t) for t in (q_BSHD, k_BSHD, v_BSHD))
    o_BSHD = torch.empty_like(q_BSHD)
    lse_BHS = torch.empty(B, Hq, S, dtype=acc_dtype(q_BSHD.dtype), device=q_BSHD.device)
    if B * S * Hq == 0:
        return o_BSHD, lse_BHS
    bm, bn = blocks.fwd_m, blocks.fwd_n
    grid = (triton.cdiv(S, bm), B * Hq)
    has_docs = doc_ids_BS is not None
    ranges = doc_tile_ranges(doc_ids_BS, bm) if has_docs else lse_BHS
    dt = kernel_dtypes(q_BSHD.dtype)
    _attn_fwd_kernel[grid](
        q_BSHD, k_BSHD, v_BSHD, o_BSHD, lse_BHS, doc_ids_BS if has_docs else lse_BHS, ranges,
        *bsh_strides(q_BSHD), *bsh_strides(k_BSHD), *bsh_strides(v_BSHD), *bsh_strides(o_BSHD),
        S, Dh, Hq, Hq // Hkv, softmax_scale * LOG2E,
        CAUSAL=causal, HAS_DOCS=has_docs, PAD_D=next_pow2(max(Dh, 16)) != Dh,
        UPCAST=dt.upcast, ACC_DTYPE=dt.acc, PRECISION=dt.precision,
        BM=bm, BN=bn, BD=next_pow2(max(Dh, 16)),
        num_warps=blocks.fwd_warps, num_stages=blocks.fwd_stages)
    return o_BSHD, lse_BHS


class FlashAttentionFunction(torch.autograd.Function):
    """Differentiable outputs: o_BSHD and lse_BHS (a gradient reaching lse is folded into the
    backward's delta: d lse_i / d s_ij = p_ij)."""

    @staticmethod
    def forward(ctx, q_BSHD, k_BSHD, v_BSHD, causal, softmax_scale, doc_ids_BS, blocks):
        o_BSHD, lse_BHS = attention_fwd(q_BSHD, k_BSHD, v_BSHD, causal, softmax_scale,
                                        doc_ids_BS, blocks)
        ctx.save_for_backward(q_BSHD, k_BSHD, v_BSHD, o_BSHD, lse_BHS, doc_ids_BS)
        ctx.causal, ctx.softmax_scale, ctx.blocks = causal, softmax_scale, blocks
        ctx.set_materialize_grads(False)  # an unused lse then costs no zeros buffer and read
        return o_BSHD, lse_BHS

    @staticmethod
    def backward(ctx, grad_o_BSHD, grad_lse_BHS):
        q_BSHD, k_BSHD, v_BSHD, o_BSHD, lse_BHS, doc_ids_BS = ctx.saved_tensors
        if grad_o_BSHD is None:  # only lse was used
            grad_o_BSHD = torch.zeros_like(o_BSHD)
        dq, dk, dv = attention_bwd(grad_o_BSHD, grad_lse_BHS, q_BSHD, k_BSHD, v_BSHD, o_BSHD,
                                   lse_BHS, ctx.causal, ctx.softmax_scale, doc_ids_BS, ctx.blocks)
        return dq, dk, dv, None, None, None, None


def _check_qkv(q_BSHD, k_BSHD, v_BSHD) -> None:
    if q_BSHD.dim() != 4 or k_BSHD.dim() != 4 or v_BSHD.shape != k_BSHD.shape:
        raise ValueError(f"expected q [B, S, Hq, Dh] and k, v [B, S, Hkv, Dh]; got "
                         f"{tuple(q_BSHD.shape)}, {tuple(k_BSHD.shape)}, {tuple(v_BSHD.shape)}")
    (B, S, Hq, Dh), Hkv = q_BSHD.shape, k_BSHD.shape[2]
    if k_BSHD.shape[0] != B or k_BSHD.shape[1] != S or k_BSHD.shape[3] != Dh:
        raise ValueError(f"k/v shape {tuple(k_BSHD.shape)} does not match q {tuple(q_BSHD.shape)}"
                         " (self-attention: same B, S and Dh)")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if not (q_BSHD.dtype == k_BSHD.dtype == v_BSHD.dtype) or not q_BSHD.is_floating_point():
        raise ValueError(f"q, k, v must share one float dtype, got {q_BSHD.dtype}, "
                         f"{k_BSHD.dtype}, {v_BSHD.dtype}")
    if Dh > 128:  # the GPU tiles are sized (shared memory) for head dims up to 128
        raise ValueError(f"head dim {Dh} > 128 is not supported")
    if q_BSHD.shape[0] * Hq > 65535:  # grid axis 1 (CUDA's limit); tiles of one head on axis 0
        raise ValueError(f"batch x query heads = {q_BSHD.shape[0] * Hq} > 65535")


def flash_attention(q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor,
                    causal: bool = False, softmax_scale: Optional[float] = None,
                    doc_ids_BS: Optional[torch.Tensor] = None, *, return_lse: bool = False,
                    blocks: Optional[AttentionBlocks] = None):
    """Attention of q_BSHD [B, S, Hq, Dh] over k_BSHD, v_BSHD [B, S, Hkv, Dh] (Hq % Hkv == 0);
    returns o_BSHD [B, S, Hq, Dh] (and lse_BHS [B, Hq, S] fp32 with ``return_lse``).
    ``causal``: key j <= query i. ``doc_ids_BS`` (int, [B, S], non-decreasing along S): packed
    documents, no attention across them. ``softmax_scale`` defaults to 1/sqrt(Dh).
    ``blocks`` overrides the tile sizes (tests use it to exercise GPU-sized tiles)."""
    _check_qkv(q_BSHD, k_BSHD, v_BSHD)
    B, S, Hq, Dh = q_BSHD.shape
    device = check_device(q_BSHD, k_BSHD, v_BSHD)
    if doc_ids_BS is not None:
        check_device(q_BSHD, doc_ids_BS)
        doc_ids_BS = check_doc_ids(doc_ids_BS, B, S)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(Dh)
    blocks = blocks or default_blocks(Dh, device, q_BSHD.dtype)
    o_BSHD, lse_BHS = FlashAttentionFunction.apply(q_BSHD, k_BSHD, v_BSHD, bool(causal), scale,
                                                   doc_ids_BS, blocks)
    return (o_BSHD, lse_BHS) if return_lse else o_BSHD


def doc_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """doc_ids [T] int32 from cumulative sequence lengths [n + 1] (flash-attn's varlen API):
    token t is in segment s when cu[s] <= t < cu[s + 1]; tokens past cu[n] form segment n.
    Device ops only (no sync)."""
    tokens = torch.arange(T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), tokens, right=True).to(torch.int32)


def flash_attention_varlen(q_THD: torch.Tensor, k_THD: torch.Tensor, v_THD: torch.Tensor,
                           cu_seqlens: torch.Tensor, causal: bool = False,
                           softmax_scale: Optional[float] = None, *, return_lse: bool = False,
                           blocks: Optional[AttentionBlocks] = None):
    """flash-attn's varlen self-attention: q_THD [T, Hq, Dh], k_THD / v_THD [T, Hkv, Dh] hold
    packed sequences with boundaries ``cu_seqlens`` [n + 1] (int, cu[0] = 0, non-decreasing);
    returns o_THD [T, Hq, Dh] (and lse_HT [Hq, T] with ``return_lse``). One batch row of
    document-masked attention underneath."""
    if q_THD.dim() != 3:
        raise ValueError(f"q_THD must be [T, Hq, Dh], got {tuple(q_THD.shape)}")
    doc_ids = doc_ids_from_cu_seqlens(cu_seqlens, q_THD.shape[0])[None]
    out = flash_attention(q_THD[None], k_THD[None], v_THD[None], causal, softmax_scale, doc_ids,
                          return_lse=return_lse, blocks=blocks)
    if return_lse:
        return out[0][0], out[1][0]
    return out[0]
