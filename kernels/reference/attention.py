"""Plain-torch reference of flash attention (``mm1_moe.kernels.attention``): the oracle of its
tests and the baseline of its benchmark. Autograd flows through q, k and v.

Shape legend: B batch (sequences), S sequence length (tokens per sequence), Hq query heads,
Hkv key/value heads (Hq % Hkv == 0; query head h reads kv head h // (Hq // Hkv)), Dh head dim.

Semantics (shared with the kernel):
- q_BSHD [B, S, Hq, Dh], k_BSHD / v_BSHD [B, S, Hkv, Dh] (flash-attn's layout);
  o_BSHD [B, S, Hq, Dh]; lse_BHS [B, Hq, S] = logsumexp over the attended keys of the scaled
  scores (natural log, as flash-attn's softmax_lse).
- Query i attends key j iff (not causal or j <= i) and (no doc ids or doc[i] == doc[j]):
  packed documents never attend across their boundaries.
- softmax_scale defaults to 1/sqrt(Dh).
- Runs in the input dtype (so the same code run in bf16 gives the ratio rule's baseline error),
  or in fp32 with ``upcast=True`` (the oracle for bf16 inputs).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def attention_mask_reference(S: int, causal: bool, doc_ids_BS: Optional[torch.Tensor] = None,
                             device=None) -> Optional[torch.Tensor]:
    """Boolean mask [B or 1, 1, S, S] (True = attend) of causal and/or document masking;
    None when nothing is masked."""
    if doc_ids_BS is None and not causal:
        return None
    device = doc_ids_BS.device if doc_ids_BS is not None else device
    mask = torch.ones(1, 1, S, S, dtype=torch.bool, device=device)
    if causal:
        mask = mask & torch.ones(S, S, dtype=torch.bool, device=device).tril()
    if doc_ids_BS is not None:
        same_doc = doc_ids_BS[:, None, :, None] == doc_ids_BS[:, None, None, :]
        mask = mask & same_doc
    return mask


def doc_ids_from_cu_seqlens_reference(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """doc_ids [T] (int32) from flash-attn's cumulative sequence lengths, by a plain loop:
    token t belongs to segment s when cu[s] <= t < cu[s+1]; tokens past cu[-1] form one more."""
    bounds = [int(x) for x in cu_seqlens.tolist()]
    doc = torch.full((T,), len(bounds) - 1, dtype=torch.int32)
    for s in range(len(bounds) - 1):
        doc[bounds[s]:bounds[s + 1]] = s
    return doc.to(cu_seqlens.device)


def attention_reference(q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor,
                        causal: bool = False, softmax_scale: Optional[float] = None,
                        doc_ids_BS: Optional[torch.Tensor] = None,
                        upcast: bool = False) -> torch.Tensor:
    """o_BSHD by torch ``scaled_dot_product_attention`` with an explicit boolean mask
    (block-diagonal for documents, lower-triangular for causal); GQA by repeat_interleave."""
    B, S, Hq, Dh = q_BSHD.shape
    Hkv = k_BSHD.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(Dh)
    dtype = torch.float32 if upcast and q_BSHD.dtype != torch.float64 else q_BSHD.dtype
    q, k, v = (t.to(dtype).transpose(1, 2) for t in (q_BSHD, k_BSHD, v_BSHD))  # [B, H, S, Dh]
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    mask = attention_mask_reference(S, causal, doc_ids_BS, device=q.device)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return o.transpose(1, 2)


def attention_lse_reference(q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, causal: bool = False,
                            softmax_scale: Optional[float] = None,
                            doc_ids_BS: Optional[torch.Tensor] = None) -> torch.Tensor:
    """lse_BHS [B, Hq, S] in fp32 (fp64 for fp64 inputs): logsumexp of the scaled, masked
    scores, from an explicit [B, Hq, S, S] score matrix."""
    B, S, Hq, Dh = q_BSHD.shape
    Hkv = k_BSHD.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(Dh)
    dtype = torch.float64 if q_BSHD.dtype == torch.float64 else torch.float32
    q = q_BSHD.to(dtype).transpose(1, 2)
    k = k_BSHD.to(dtype).transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    mask = attention_mask_reference(S, causal, doc_ids_BS, device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(scores, dim=-1)


def attention_flops(B: int, S: int, Hq: int, Dh: int, causal: bool, backward: bool = False,
                    doc_lengths: Optional[list] = None) -> float:
    """FLOPs of attention as flash-attn's benchmarks count them: forward 4*B*Hq*S^2*Dh (two
    matmuls of 2*S*S*Dh), halved for causal; backward 2.5x the forward (five matmuls against
    two). With ``doc_lengths`` (one sequence's documents) S^2 becomes sum(len^2)."""
    pairs = float(S * S) if doc_lengths is None else float(sum(n * n for n in doc_lengths))
    flops = 4.0 * B * Hq * pairs * Dh
    if causal:
        flops /= 2
    return flops * (2.5 if backward else 1.0)
