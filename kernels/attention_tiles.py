"""What the attention forward (``attention.py``) and backward (``attention_bwd.py``) kernels
share: the tile-size record, the jit helpers that bound, load and mask tiles, and the host-side
helpers that prepare their arguments. Both kernel files import from here, never from each other.

Shape legend (as ``attention.py``): B batch, S sequence length, H heads, Dh head dim (BD =
next_pow2(Dh) in the kernels); BM / BN query / key rows per tile.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # the kernels work in log2 units: exp2 is the fast exponential


@dataclasses.dataclass(frozen=True)
class AttentionBlocks:
    """Tile sizes and launch options of the three kernel families (fwd, bwd dK/dV, bwd dQ)."""
    fwd_m: int
    fwd_n: int
    dkdv_m: int
    dkdv_n: int
    dq_m: int
    dq_n: int
    fwd_warps: int = 4
    fwd_stages: int = 1
    bwd_warps: int = 4
    bwd_stages: int = 1


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def tile_spans(a, lo, hi, single, B_ME: tl.constexpr, B_IT: tl.constexpr,
               CAUSAL: tl.constexpr, ME_IS_Q: tl.constexpr):
    """Tiles of the iterated axis (step B_IT) seen by my tile [a, a + B_ME): [lo_blk, end), of
    which [full_lo, full_hi) need no mask. [lo, hi) is the document range of my tile (0, S
    without documents); ``single``: my tile lies in one document, so the tiles inside [lo, hi)
    need no document mask (else every tile is masked)."""
    full_lo = tl.cdiv(lo, B_IT) * B_IT
    full_hi = (hi // B_IT) * B_IT
    if CAUSAL:
        if ME_IS_Q:  # keys j <= i: up to my last query; unmasked up to my first
            hi = tl.minimum(hi, a + B_ME)
            full_hi = tl.minimum(full_hi, ((a + 1) // B_IT) * B_IT)
        else:  # queries i >= j: from my first key; unmasked from my last
            lo = tl.maximum(lo, a)
            full_lo = tl.maximum(full_lo, tl.cdiv(a + B_ME - 1, B_IT) * B_IT)
    lo_blk = (lo // B_IT) * B_IT
    end = tl.cdiv(hi, B_IT) * B_IT
    full_lo = tl.minimum(tl.maximum(full_lo, lo_blk), end)
    full_hi = tl.maximum(tl.minimum(full_hi, end), full_lo)
    full_lo = tl.where(single, full_lo, lo_blk)
    full_hi = tl.where(single, full_hi, lo_blk)
    return lo_blk, full_lo, full_hi, end


@triton.jit
def doc_span(ranges_ptr, b, pid, S, HAS_DOCS: tl.constexpr):
    """(lo, hi, single) of tile ``pid`` of sequence ``b`` from the host's ranges [B, nt, 3]."""
    if HAS_DOCS:
        base = ranges_ptr + (b * tl.num_programs(0) + pid) * 3
        lo = tl.load(base)
        hi = tl.load(base + 1)
        single = tl.load(base + 2) != 0
    else:
        lo = S * 0  # tensors, like the loaded values, so both branches have one type
        hi = S + 0
        single = S >= 0
    return lo, hi, single


@triton.jit
def load_tile(ptrs, rows, S, offs_d, Dh, PAD_D: tl.constexpr, UPCAST: tl.constexpr,
              ACC_DTYPE: tl.constexpr):
    """A [rows, BD] tile; rows >= S and head-dim padding load as 0."""
    if PAD_D:
        x = tl.load(ptrs, mask=(rows[:, None] < S) & (offs_d[None, :] < Dh), other=0.0)
    else:
        x = tl.load(ptrs, mask=rows[:, None] < S, other=0.0)
    if UPCAST:
        x = x.to(ACC_DTYPE)
    return x


@triton.jit
def attend(rows_q, rows_k, S, doc_q, docs_ptr, CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr):
    """[len(rows_q), len(rows_k)] bool: query attends key (in range, causal, same document)."""
    ok = (rows_k[None, :] < S) & (rows_q[:, None] < S)
    if CAUSAL:
        ok = ok & (rows_k[None, :] <= rows_q[:, None])
    if HAS_DOCS:
        doc_k = tl.load(docs_ptr + rows_k, mask=rows_k < S, other=-1)
        ok = ok & (doc_q[:, None] == doc_k[None, :])
    return ok


# ----------------------------------------------------------------------------- host side


def bsh_strides(x: torch.Tensor) -> Tuple[int, int, int]:
    """The (B, S, H) strides of a [B, S, H, Dh] tensor, as the kernels take them."""
    return x.stride(0), x.stride(1), x.stride(2)


def dense_last(x: torch.Tensor) -> torch.Tensor:
    """Any [B, S, H, Dh] strides are fine as long as Dh is contiguous."""
    return x if x.stride(-1) == 1 else x.contiguous()


def doc_tile_ranges(doc_ids_BS: torch.Tensor, block: int) -> torch.Tensor:
    """ranges [B, ceil(S / block), 3] int32 for tiles of ``block`` rows: (first token of the
    tile's first document, one past the last token of its last document, 1 if the tile lies in
    one document). Needs non-decreasing doc ids; device ops only, no host sync."""
    B, S = doc_ids_BS.shape
    starts = torch.arange(0, S, block, device=doc_ids_BS.device)
    lasts = (starts + block - 1).clamp(max=S - 1)
    first_doc, last_doc = doc_ids_BS[:, starts], doc_ids_BS[:, lasts]
    lo = torch.searchsorted(doc_ids_BS, first_doc, side="left")
    hi = torch.searchsorted(doc_ids_BS, last_doc, side="right")
    single = (first_doc == last_doc).long()
    return torch.stack([lo, hi, single], dim=-1).to(torch.int32).contiguous()
