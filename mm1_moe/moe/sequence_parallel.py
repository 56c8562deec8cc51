"""Routing under sequence parallelism: each tensor-parallel rank holds its own S/tp slice of the
sequence (tokens S-major, so rank r holds the contiguous token block r of the micro-batch) and
runs the MoE on those tokens only, no duplicated expert work.

The routing is still that of one process over all tokens: the router logits (E floats per
token, ~1% of the hidden states at D = 4096, E = 32) are gathered over the TP group and every
rank runs the router on all of them. So the top-k choices, the load-balancing loss (a product of
expert fractions and mean probabilities over all tokens: a sum of per-rank losses would not give
it), the z-loss and the statistics are exactly the single-process ones, and each rank then
dispatches its own block of tokens. In the backward each rank keeps its own rows of the logits'
gradient (the ranks computed the same aux-loss gradient, so no reduction is needed there); the
router weight's gradient from its own tokens is partial, and Megatron sums it over the TP group
because the weight carries the ``sequence_parallel`` attribute.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist


def rank_sizes(n_local: int, group, device: torch.device) -> List[int]:
    """Rows each rank of ``group`` holds (one all-gather of an int and one host sync)."""
    mine = torch.tensor([n_local], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    return [int(n) for n in torch.cat(every).tolist()]


def rank_rows(sizes: List[int], group) -> slice:
    """This rank's rows in the concatenation of every rank's rows."""
    start = sum(sizes[:dist.get_rank(group)])
    return slice(start, start + sizes[dist.get_rank(group)])


class _GatherRows(torch.autograd.Function):
    """Forward: every rank's rows, concatenated in rank order (uneven sizes allowed). Backward:
    this rank's rows of the gradient, as computed here (the consumers on every rank computed
    the same thing, so nothing is summed)."""

    @staticmethod
    def forward(ctx, x_local: torch.Tensor, sizes: List[int], group):
        rows = rank_rows(sizes, group)
        ctx.rows = rows
        width = max(sizes)
        padded = x_local.new_zeros((width,) + tuple(x_local.shape[1:]))
        padded[: x_local.shape[0]] = x_local
        pieces = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(pieces, padded.contiguous(), group=group)
        return torch.cat([piece[:n] for piece, n in zip(pieces, sizes)])

    @staticmethod
    def backward(ctx, grad_all: torch.Tensor):
        return grad_all[ctx.rows].contiguous(), None, None


def gather_rows(x_local: torch.Tensor, sizes: List[int], group) -> torch.Tensor:
    """[sum(sizes), ...] from each rank's [sizes[r], ...] (differentiable, see ``_GatherRows``)."""
    if len(sizes) != dist.get_world_size(group) or x_local.shape[0] != sizes[dist.get_rank(group)]:
        raise ValueError(f"gather_rows: this rank holds {x_local.shape[0]} rows, sizes {sizes}")
    return _GatherRows.apply(x_local, sizes, group)


def local_token_mask(token_mask_T: Optional[torch.Tensor], n_local: int,
                     group) -> Optional[torch.Tensor]:
    """This rank's slice of a token mask given for the whole micro-batch (Megatron passes
    ``padding_mask`` [B, S] for the full sequence), or the mask itself if it is already local."""
    if token_mask_T is None or token_mask_T.shape[0] == n_local:
        return token_mask_T
    tp = dist.get_world_size(group)
    if token_mask_T.shape[0] != n_local * tp:
        raise ValueError(f"MoE token mask covers {token_mask_T.shape[0]} tokens; this rank holds "
                         f"{n_local} of {n_local * tp} (sequence parallel over {tp} ranks)")
    rank = dist.get_rank(group)
    return token_mask_T[rank * n_local:(rank + 1) * n_local]
