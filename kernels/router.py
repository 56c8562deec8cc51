"""Top-k router: softmax, top-k selection, expert counts, load-balance loss and z-loss in one pass
over the router logits, and the matching backward in one pass.

Shape legend: T tokens, E experts, K top-k, N = T*K routed rows; nb token blocks of the grid.

Semantics are those of ``kernels/reference/router.py`` (read its docstring): orders
"softmax_topk" (MM1, ST-MoE) and "topk_softmax" (Mixtral); ids ranked by logit, descending,
exact ties to the lower expert index; aux and z over the tokens that ``token_mask_T`` keeps.

Layers: ``_router_fwd_kernel`` / ``_router_bwd_kernel`` -> ``router_fwd`` / ``router_bwd`` ->
``RouterFunction`` -> ``router(...)``.

Design notes:
- One program holds a [BLOCK_T, next_pow2(E)] tile of logits; top-k is K rounds of
  argmax-and-mask over it (cheap for K <= 8; K = E works but unrolls K rounds).
- Reductions over tokens (counts, kept-token counts and prob sums, z sums) are written as per-block
  partials to [nb, E] buffers and summed with torch.sum on the host: deterministic, unlike float
  atomics, and with no host sync (n stays a device tensor).
- The backward recomputes p = exp(logits - lse) from the saved per-token lse instead of saving
  the [T, E] probs: one fp32 per token saved instead of E.
- All math runs in fp32 whatever the logits dtype (fp64 for fp64 logits, for gradcheck): the
  router is memory bound, so upcasting right after the load costs nothing, and the Triton
  interpreter computes bf16 arithmetic wrongly.

Caution: tested in the Triton interpreter (CPU) and compiled for sm90/sm80 with bf16 logits;
not yet run or timed on a GPU. NaN logits are unsupported (ids stay in [0, E) but are arbitrary).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, check_device, kernel_dtypes, next_pow2, use_interpreter_tiles
from .reference.router import ORDERS

# GPU tile: about 2048 logits per program (16 per thread at 4 warps), e.g. 32 tokens at E=64,
# 8 at E=256: several [BLOCK_T, BLOCK_E] fp32 tiles are live at once and more would spill.
# Not yet tuned on a GPU.
GPU_TILE_ELEMENTS = 2048
GPU_MAX_BLOCK_T = 128
NUM_WARPS = 4
# Interpreter tile: each tl op is one numpy call over the tile, so fewer, larger programs win.
INTERPRET_TILE_ELEMENTS = 1 << 16


@triton.jit
def _router_fwd_kernel(logits_ptr, mask_ptr, bias_ptr, weights_ptr, ids_ptr, lse_ptr,
                       counts_part_ptr, stat_part_ptr, psum_part_ptr, zsum_part_ptr, kept_part_ptr,
                       T, E,
                       K: tl.constexpr, TOPK_SOFTMAX: tl.constexpr, NORMALIZE: tl.constexpr,
                       HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    row_ok = rows < T
    col_ok = cols < E
    col_ok_TE = (rows[:, None] >= 0) & col_ok[None, :]  # col_ok broadcast to the full tile
    offs_TE = rows.to(tl.int64)[:, None] * E + cols[None, :]

    # Rows past T load as zeros (finite softmax, excluded below); padded experts as -inf (p = 0).
    x_TE = tl.load(logits_ptr + offs_TE, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    x_TE = tl.where(col_ok_TE, x_TE.to(ACC_DTYPE), float("-inf"))
    m_T = tl.max(x_TE, axis=1)
    ex_TE = tl.exp(x_TE - m_T[:, None])
    s_T = tl.sum(ex_TE, axis=1)
    p_TE = ex_TE / s_T[:, None]
    lse_T = m_T + tl.log(s_T)

    # The selection key: the logits (ranking by p would turn distinct logits into exp-rounding
    # ties), or with an expert bias the biased score: p + b, or logit + b (topk_softmax).
    if HAS_BIAS:
        b_E = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)
        if TOPK_SOFTMAX:
            key_TE = x_TE + b_E[None, :]
        else:
            key_TE = p_TE + b_E[None, :]
        key_TE = tl.where(col_ok_TE, key_TE, float("-inf"))  # padded experts: never chosen
    else:
        key_TE = x_TE

    # K rounds of argmax over the experts not yet taken; ties go to the lowest index.
    free_TE = col_ok_TE
    ids_TK = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    top_TK = tl.zeros([BLOCK_T, BLOCK_K], dtype=ACC_DTYPE)  # selected p, or logit (topk_softmax)
    for j in tl.static_range(K):
        cand_TE = tl.where(free_TE, key_TE, float("-inf"))
        best_T = tl.max(cand_TE, axis=1)
        # `free &`: when only -inf logits remain, pick among the free ones, never a taken one.
        is_best_TE = free_TE & (cand_TE == best_T[:, None])
        idx_T = tl.min(tl.where(is_best_TE, cols[None, :], BLOCK_E), axis=1)
        idx_T = tl.minimum(idx_T, E - 1)  # only NaN rows get here: keep ids in range
        hit_TE = cols[None, :] == idx_T[:, None]
        free_TE = free_TE & (~hit_TE)
        if TOPK_SOFTMAX and HAS_BIAS:
            val_T = tl.max(tl.where(hit_TE, x_TE, float("-inf")), axis=1)  # the unbiased logit
        elif TOPK_SOFTMAX:
            val_T = best_T
        else:
            val_T = tl.sum(tl.where(hit_TE, p_TE, 0.0), axis=1)  # exactly p[idx]
        ids_TK = tl.where(kcols[None, :] == j, idx_T[:, None], ids_TK)
        top_TK = tl.where(kcols[None, :] == j, val_T[:, None], top_TK)

    k_ok_TK = (rows[:, None] >= 0) & (kcols[None, :] < K)
    if TOPK_SOFTMAX:
        # Round 0 took the largest selected logit: subtract it for a stable softmax over K.
        top_TK = tl.where(k_ok_TK, top_TK, float("-inf"))
        ek_TK = tl.exp(top_TK - tl.max(top_TK, axis=1)[:, None])
        w_TK = ek_TK / tl.sum(ek_TK, axis=1)[:, None]
    else:
        w_TK = top_TK  # padded K columns hold 0
        if NORMALIZE:
            w_TK = w_TK / tl.sum(w_TK, axis=1)[:, None]
    offs_TK = rows.to(tl.int64)[:, None] * K + kcols[None, :]
    mask_TK = row_ok[:, None] & (kcols[None, :] < K)
    tl.store(weights_ptr + offs_TK, w_TK, mask=mask_TK)
    tl.store(ids_ptr + offs_TK, ids_TK, mask=mask_TK)
    tl.store(lse_ptr + rows, lse_T, mask=row_ok)

    # Per-block partials of the token reductions (summed on the host).
    if HAS_MASK:
        kept_T = row_ok & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
    else:
        kept_T = row_ok
    chosen_TE = col_ok_TE & (~free_TE) & row_ok[:, None]
    counts_E = tl.sum(chosen_TE.to(tl.int32), axis=0)
    stat_E = tl.sum((chosen_TE & kept_T[:, None]).to(tl.int32), axis=0)
    psum_E = tl.sum(tl.where(kept_T[:, None] & col_ok_TE, p_TE, 0.0), axis=0)
    tl.store(counts_part_ptr + pid * E + cols, counts_E, mask=col_ok)
    tl.store(stat_part_ptr + pid * E + cols, stat_E, mask=col_ok)
    tl.store(psum_part_ptr + pid * E + cols, psum_E, mask=col_ok)
    tl.store(zsum_part_ptr + pid, tl.sum(tl.where(kept_T, lse_T * lse_T, 0.0), axis=0))
    tl.store(kept_part_ptr + pid, tl.sum(kept_T.to(tl.int32), axis=0))


@triton.jit
def _router_bwd_kernel(logits_ptr, mask_ptr, lse_ptr, ids_ptr, weights_ptr, grad_w_ptr,
                       aux_coef_ptr, z_coef_ptr, grad_logits_ptr,
                       T, E,
                       K: tl.constexpr, TOPK_SOFTMAX: tl.constexpr, NORMALIZE: tl.constexpr,
                       HAS_MASK: tl.constexpr, ACC_DTYPE: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """grad_logits = d/dlogits of  <grad_w, weights> + <aux_coef, prob_sum> + grad_z * z, with
    aux_coef_E the gradient of prob_sum_E (= d aux/d p_te on a kept token t; for one
    micro-batch's load-balancing loss, grad_aux * E * stat_counts_E / (n^2 K)) and
    z_coef = 2 * grad_z / n  (d z/d logits_te = z_coef * lse_t * p_te on a kept token t)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    col_ok_TE = (rows[:, None] >= 0) & col_ok[None, :]
    tile_ok = row_ok[:, None] & col_ok[None, :]
    offs_TE = rows.to(tl.int64)[:, None] * E + cols[None, :]

    x_TE = tl.load(logits_ptr + offs_TE, mask=tile_ok, other=0.0)
    x_TE = tl.where(col_ok_TE, x_TE.to(ACC_DTYPE), float("-inf"))
    lse_T = tl.load(lse_ptr + rows, mask=row_ok, other=0.0).to(ACC_DTYPE)
    p_TE = tl.exp(x_TE - lse_T[:, None])
    if HAS_MASK:
        kept_T = row_ok & (tl.load(mask_ptr + rows, mask=row_ok, other=0) != 0)
    else:
        kept_T = row_ok

    # Scatter the K weight gradients (and weights) onto their experts.
    g_sel_TE = tl.zeros([BLOCK_T, BLOCK_E], dtype=ACC_DTYPE)
    w_sel_TE = tl.zeros([BLOCK_T, BLOCK_E], dtype=ACC_DTYPE)
    sel_TE = (rows[:, None] < 0) & (cols[None, :] < 0)  # all False: the selected experts
    dot_T = tl.zeros([BLOCK_T], dtype=ACC_DTYPE)  # sum_j grad_w_j * w_j
    for j in tl.static_range(K):
        id_T = tl.load(ids_ptr + rows.to(tl.int64) * K + j, mask=row_ok, other=-1)
        g_T = tl.load(grad_w_ptr + rows.to(tl.int64) * K + j, mask=row_ok, other=0.0).to(ACC_DTYPE)
        w_T = tl.load(weights_ptr + rows.to(tl.int64) * K + j, mask=row_ok, other=0.0).to(ACC_DTYPE)
        hit_TE = cols[None, :] == id_T[:, None]
        g_sel_TE = tl.where(hit_TE, g_T[:, None], g_sel_TE)
        w_sel_TE = tl.where(hit_TE, w_T[:, None], w_sel_TE)
        sel_TE = sel_TE | hit_TE
        dot_T += g_T * w_T

    # gp: gradient w.r.t. the full softmax p; gx: gradient reaching the logits directly.
    aux_coef_E = tl.load(aux_coef_ptr + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)
    gp_TE = tl.where(kept_T[:, None], aux_coef_E[None, :], 0.0)
    if TOPK_SOFTMAX:
        # w = softmax over the selected logits: dw/dx_sel = w (g - <g, w>), 0 elsewhere.
        gx_TE = w_sel_TE * (g_sel_TE - dot_T[:, None])
    else:
        gx_TE = tl.zeros([BLOCK_T, BLOCK_E], dtype=ACC_DTYPE)
        if NORMALIZE:
            # w_j = p_j / S over the selected: d/dp_j = (g_j - <g, w>) / S.
            s_T = tl.sum(tl.where(sel_TE, p_TE, 0.0), axis=1)
            s_T = tl.where(row_ok, s_T, 1.0)  # rows past T select nothing: avoid 0/0
            gp_TE += tl.where(sel_TE, (g_sel_TE - dot_T[:, None]) / s_T[:, None], 0.0)
        else:
            gp_TE += g_sel_TE
    # Softmax Jacobian: dL/dx = p * (gp - <p, gp>).
    gx_TE += p_TE * (gp_TE - tl.sum(p_TE * gp_TE, axis=1)[:, None])
    z_coef = tl.load(z_coef_ptr).to(ACC_DTYPE)
    gx_TE += tl.where(kept_T[:, None], (z_coef * lse_T)[:, None] * p_TE, 0.0)
    tl.store(grad_logits_ptr + offs_TE, gx_TE.to(grad_logits_ptr.dtype.element_ty), mask=tile_ok)


# ----------------------------------------------------------------------------- host side


def gpu_block_t(E: int) -> int:
    """Tokens per program on a GPU (also what the compile test builds)."""
    return max(1, min(GPU_MAX_BLOCK_T, GPU_TILE_ELEMENTS // next_pow2(E)))


def _block_t(T: int, E: int, block_t: Optional[int]) -> int:
    if block_t is not None:
        return next_pow2(block_t)
    if use_interpreter_tiles():
        return max(1, min(next_pow2(T), INTERPRET_TILE_ELEMENTS // next_pow2(E)))
    return gpu_block_t(E)


def _mask_arg(token_mask_T: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    # A bool tensor viewed as uint8 loads as bytes (avoids i1 pointers); unused without a mask.
    return fallback if token_mask_T is None else token_mask_T.contiguous().view(torch.uint8)


def router_fwd(logits_TE: torch.Tensor, k: int, order: str = "softmax_topk",
               normalize: bool = False, token_mask_T: Optional[torch.Tensor] = None,
               block_t: Optional[int] = None,
               bias_E: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ...]:
    """Forward launcher. Returns (weights_TK, ids_TK int32, counts_E int32, prob_sum_E, z_loss,
    stat_counts_E int32, num_stat_tokens int64 0-d, lse_T); float outputs in the accumulation
    dtype (fp32, fp64 for fp64 logits). prob_sum_E: the softmax probabilities summed over the
    kept tokens (the load-balancing loss is formed from it, ``load_balance_loss``).
    ``block_t`` overrides the tokens per program; ``bias_E`` (an expert bias) joins the top-k
    choice only."""
    T, E = logits_TE.shape
    device = check_device(logits_TE) if token_mask_T is None else check_device(logits_TE,
                                                                               token_mask_T)
    if bias_E is not None:
        check_device(logits_TE, bias_E)
        bias_E = bias_E.to(acc_dtype(logits_TE.dtype)).contiguous()
    acc = acc_dtype(logits_TE.dtype)
    logits_TE = logits_TE.contiguous()
    block_e = next_pow2(E)
    bt = _block_t(T, E, block_t)
    nb = triton.cdiv(T, bt)
    weights_TK = torch.empty(T, k, dtype=acc, device=device)
    ids_TK = torch.empty(T, k, dtype=torch.int32, device=device)
    lse_T = torch.empty(T, dtype=acc, device=device)
    # Every program writes its whole row of partials; only T == 0 (no program) needs zeros.
    alloc = torch.empty if nb > 0 else torch.zeros
    counts_part = alloc(max(nb, 1), E, dtype=torch.int32, device=device)
    stat_part = alloc(max(nb, 1), E, dtype=torch.int32, device=device)
    psum_part = alloc(max(nb, 1), E, dtype=acc, device=device)
    zsum_part = alloc(max(nb, 1), dtype=acc, device=device)
    kept_part = alloc(max(nb, 1), dtype=torch.int32, device=device)
    if nb > 0:
        _router_fwd_kernel[(nb,)](
            logits_TE, _mask_arg(token_mask_T, kept_part),
            bias_E if bias_E is not None else lse_T, weights_TK, ids_TK, lse_T,
            counts_part, stat_part, psum_part, zsum_part, kept_part, T, E,
            K=k, TOPK_SOFTMAX=order == "topk_softmax", NORMALIZE=normalize,
            HAS_MASK=token_mask_T is not None, HAS_BIAS=bias_E is not None,
            ACC_DTYPE=kernel_dtypes(logits_TE.dtype).acc,
            BLOCK_T=bt, BLOCK_E=block_e, BLOCK_K=next_pow2(k), num_warps=NUM_WARPS)
    counts_E = counts_part.sum(0, dtype=torch.int32)
    stat_counts_E = stat_part.sum(0, dtype=torch.int32)
    n = kept_part.sum(dtype=torch.int64)
    n_acc = n.clamp(min=1).to(acc)  # n == 0: the sums are 0, so is the loss (no NaN)
    z_loss = zsum_part.sum() / n_acc
    return weights_TK, ids_TK, counts_E, psum_part.sum(0), z_loss, stat_counts_E, n, lse_T


def load_balance_loss(prob_sum_E: torch.Tensor, num_tokens: torch.Tensor,
                      load_counts_E: torch.Tensor, load_tokens: torch.Tensor, k: int) -> torch.Tensor:
    """Switch / ST-MoE load balance, E * sum_e f_e * P_e, with P_e = prob_sum_E / num_tokens
    (differentiable: the gradient flows through P only) and f_e = load_counts_E /
    (load_tokens * k), the fraction of routed rows that went to e. The loads may come from
    more tokens than the probabilities (a global-batch loss: all micro-batches and data-parallel
    ranks); for one micro-batch both are its own. Zero tokens give 0, not NaN."""
    acc = prob_sum_E.dtype
    n = num_tokens.clamp(min=1).to(acc)
    n_load = load_tokens.clamp(min=1).to(acc)
    E = prob_sum_E.shape[0]
    return (E / k) * (load_counts_E.to(acc) * prob_sum_E).sum() / (n_load * n)


def router_bwd(logits_TE: torch.Tensor, token_mask_T: Optional[torch.Tensor], lse_T: torch.Tensor,
               ids_TK: torch.Tensor, weights_TK: torch.Tensor, grad_weights_TK: torch.Tensor,
               grad_prob_sum_E: Optional[torch.Tensor], grad_z: torch.Tensor,
               num_stat_tokens: torch.Tensor, order: str = "softmax_topk",
               normalize: bool = False, block_t: Optional[int] = None) -> torch.Tensor:
    """Backward launcher: grad_logits_TE (logits dtype) from the gradients of weights_TK,
    prob_sum_E ([E], None: no gradient) and z_loss (0-d), with the forward's saved lse_T, ids,
    weights and kept-token count."""
    T, E = logits_TE.shape
    k = ids_TK.shape[1]
    check_device(logits_TE)
    acc = acc_dtype(logits_TE.dtype)
    logits_TE = logits_TE.contiguous()
    grad_logits_TE = torch.empty_like(logits_TE)
    if T == 0:
        return grad_logits_TE
    n_acc = num_stat_tokens.clamp(min=1).to(acc)
    # d prob_sum_e / d p_te = 1 on kept tokens: the kernel's per-expert coefficient is the
    # incoming gradient itself (for the load-balancing loss, E * f_e / n): no sync.
    aux_coef_E = (torch.zeros(E, dtype=acc, device=logits_TE.device) if grad_prob_sum_E is None
                  else grad_prob_sum_E.to(acc))
    z_coef = (2.0 * grad_z.to(acc) / n_acc).reshape(1)
    block_e = next_pow2(E)
    bt = _block_t(T, E, block_t)
    _router_bwd_kernel[(triton.cdiv(T, bt),)](
        logits_TE, _mask_arg(token_mask_T, lse_T), lse_T, ids_TK.contiguous(),
        weights_TK.contiguous(), grad_weights_TK.contiguous(), aux_coef_E.contiguous(), z_coef,
        grad_logits_TE, T, E,
        K=k, TOPK_SOFTMAX=order == "topk_softmax", NORMALIZE=normalize,
        HAS_MASK=token_mask_T is not None, ACC_DTYPE=kernel_dtypes(logits_TE.dtype).acc,
        BLOCK_T=bt, BLOCK_E=block_e, num_warps=NUM_WARPS)
    return grad_logits_TE


class RouterFunction(torch.autograd.Function):
    """Differentiable outputs: weights_TK, prob_sum_E, z_loss; the rest are integer stats. The
    expert bias is not differentiable: it only changes which experts are chosen."""

    @staticmethod
    def forward(ctx, logits_TE, k, order, normalize, token_mask_T, block_t, bias_E):
        (weights_TK, ids_TK, counts_E, prob_sum_E, z_loss, stat_counts_E, n,
         lse_T) = router_fwd(logits_TE, k, order, normalize, token_mask_T, block_t, bias_E)
        ctx.save_for_backward(logits_TE, token_mask_T, lse_T, ids_TK, weights_TK, n)
        ctx.order, ctx.normalize, ctx.block_t = order, normalize, block_t
        ctx.mark_non_differentiable(ids_TK, counts_E, stat_counts_E, n)
        return weights_TK, ids_TK, counts_E, prob_sum_E, z_loss, stat_counts_E, n

    @staticmethod
    def backward(ctx, grad_weights_TK, _ids, _counts, grad_prob_sum_E, grad_z, _stat, _n):
        logits_TE, token_mask_T, lse_T, ids_TK, weights_TK, n = ctx.saved_tensors
        if grad_weights_TK is None:
            grad_weights_TK = torch.zeros_like(weights_TK)
        if grad_z is None:
            grad_z = torch.zeros((), dtype=lse_T.dtype, device=lse_T.device)
        grad_logits_TE = router_bwd(logits_TE, token_mask_T, lse_T, ids_TK, weights_TK,
                                    grad_weights_TK, grad_prob_sum_E, grad_z, n,
                                    ctx.order, ctx.normalize, ctx.block_t)
        return grad_logits_TE, None, None, None, None, None, None


@dataclasses.dataclass(frozen=True)
class RouterOutput:
    """What ``router`` returns. weights_TK fp32 (fp64 for fp64 logits), differentiable;
    ids_TK int32, sorted by score descending; counts_E int32: routed rows per expert over ALL
    tokens (for dispatch, sums to T*K); aux_loss, z_loss: 0-d, differentiable; stat_counts_E int32
    and num_stat_tokens (0-d int64): rows per expert and tokens over the tokens token_mask_T
    keeps, for metrics (device tensors: reading them syncs); prob_sum_E: the kept tokens'
    softmax probabilities summed per expert, differentiable (aux_loss is formed from it; a
    global-batch loss forms its own, ``load_balance_loss``)."""
    weights_TK: torch.Tensor
    ids_TK: torch.Tensor
    counts_E: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    stat_counts_E: torch.Tensor
    num_stat_tokens: torch.Tensor
    prob_sum_E: torch.Tensor


def router(logits_TE: torch.Tensor, k: int, order: str = "softmax_topk", normalize: bool = False,
           token_mask_T: Optional[torch.Tensor] = None, *,
           bias_E: Optional[torch.Tensor] = None,
           block_t: Optional[int] = None) -> RouterOutput:
    """Route each of T tokens to K of E experts from logits_TE [T, E] (any float dtype).
    token_mask_T (bool [T]): False tokens are routed but left out of aux, z and the stats.
    bias_E (float [E], DeepSeek-V3's aux-loss-free balancing): added to the scores (p, or the
    logits under topk_softmax) to choose the top-k only; the weights stay unbiased.
    ``block_t`` overrides the tokens per program (tests use it to exercise GPU-sized tiles)."""
    if logits_TE.dim() != 2 or not logits_TE.is_floating_point():
        raise ValueError(f"logits_TE must be a 2-D float tensor, got {tuple(logits_TE.shape)} "
                         f"{logits_TE.dtype}")
    T, E = logits_TE.shape
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if not 1 <= int(k) <= E:
        raise ValueError(f"k must be in [1, E={E}], got {k}")
    if token_mask_T is not None and (token_mask_T.dtype != torch.bool
                                     or tuple(token_mask_T.shape) != (T,)):
        raise ValueError(f"token_mask_T must be bool of shape ({T},), got "
                         f"{token_mask_T.dtype} {tuple(token_mask_T.shape)}")
    check_bias(bias_E, E)
    (weights_TK, ids_TK, counts_E, prob_sum_E, z_loss, stat_counts_E,
     n) = RouterFunction.apply(logits_TE, int(k), order, bool(normalize), token_mask_T, block_t,
                               bias_E)
    aux_loss = load_balance_loss(prob_sum_E, n, stat_counts_E, n, int(k))
    return RouterOutput(weights_TK, ids_TK, counts_E, aux_loss, z_loss, stat_counts_E, n,
                        prob_sum_E)


def check_bias(bias_E: Optional[torch.Tensor], E: int) -> None:
    if bias_E is not None and (tuple(bias_E.shape) != (E,) or not bias_E.is_floating_point()):
        raise ValueError(f"bias_E must be a float tensor of shape ({E},), got {bias_E.dtype} "
                         f"{tuple(bias_E.shape)}")
