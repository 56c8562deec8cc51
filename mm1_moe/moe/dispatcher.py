"""Token dispatchers: move routed rows to the rank that holds their expert, and back.

Shapes: T tokens, D width, E experts (global), e = E / ep local experts, K top-k, N routed rows.

Every dispatcher first sorts this rank's T*K routed slots by global expert with our dispatch
metadata kernel (a stable counting sort). Experts are laid out contiguously by rank (rank r
holds experts [r*e, (r+1)*e)), so that order is already grouped by destination rank:

* ``GatherDispatcher`` (ep = 1, the default there; ScatterMoE's layout): no rows are copied.
  The experts read token rows through the sort (``gather_index_N``: the token of each sorted
  slot), scale their output rows by the slot's routing weight (``row_scale_N``), and combine sums
  each token's K rows unweighted. Per step this saves dispatch's [N, D] read and write in the
  forward and combine's [N, D] read of y for the weight gradient in the backward (the weight
  gradient comes from the fc2-backward epilogue instead); see ``benchmarks/bench_moe_layer.py``.
* ``LocalDispatcher`` (ep = 1, unfused): the sorted rows are copied out (x_ND), go to the
  experts, and combine takes the weighted sum. Kept as the fused path's baseline.
* ``AllToAllDispatcher`` (ep > 1): counts first (an all-to-all of the [ep, e] count table, one
  host sync to size the exchange), then rows (copied into x_ND by the dispatch kernel, then an
  all-to-all with those split sizes). Received rows are ordered by (source rank, local expert);
  a second, local sort (the same kernel, K=1) regroups them by local expert. ``combine`` undoes
  each step in reverse and then takes the weighted sum of each token's K rows with our combine
  kernel.

``dispatch`` returns the experts' input rows (expert-ordered x_ND, or x_TD with a gather index)
and a frozen ``DispatchState`` that ``run_experts`` and ``combine`` consume: no hidden state on
the dispatcher between the calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .backend import DispatchMeta, MoEOps, RouterOutput


@dataclass(frozen=True)
class DispatchState:
    """What ``combine`` needs from ``dispatch``.

    meta: this rank's sort of its T*K slots by global expert (capacity drops applied).
    offsets_e1: int32 [e+1] row offsets of the local experts in the rows handed to the experts.
    local_meta: the regrouping of received rows by local expert (ep > 1 only).
    send_splits / recv_splits: rows sent to / received from each EP rank (ep > 1 only).
    tokens_per_expert_e: int [e] rows each local expert processes (for metrics).
    gather_index_N / row_scale_N: ``GatherDispatcher`` only: the token each expert row reads
        (int32 [N_kept]) and the routing weight it is scaled by (float [N_kept], differentiable).
    """

    meta: DispatchMeta
    offsets_e1: torch.Tensor
    tokens_per_expert_e: torch.Tensor
    local_meta: Optional[DispatchMeta] = None
    send_splits: Optional[List[int]] = None
    recv_splits: Optional[List[int]] = None
    gather_index_N: Optional[torch.Tensor] = None
    row_scale_N: Optional[torch.Tensor] = None


class LocalDispatcher:
    """All experts on this rank (expert-parallel size 1)."""

    def __init__(self, num_experts: int, ops: MoEOps, capacity_factor: Optional[float] = None):
        self.num_experts, self.ops, self.capacity_factor = num_experts, ops, capacity_factor

    def _sort(self, route: RouterOutput) -> DispatchMeta:
        probs = route.weights_TK.detach() if self.capacity_factor is not None else None
        return self.ops.dispatch_metadata(route.ids_TK, self.num_experts, self.capacity_factor,
                                          probs)

    def dispatch(self, x_TD: torch.Tensor, route: RouterOutput) -> Tuple[torch.Tensor, DispatchState]:
        meta = self._sort(route)
        return self.ops.dispatch(x_TD, meta), DispatchState(meta, meta.offsets_E1, meta.counts_E)

    def combine(self, y_ND: torch.Tensor, weights_TK: torch.Tensor,
                state: DispatchState) -> torch.Tensor:
        return self.ops.combine(y_ND, weights_TK, state.meta)


class GatherDispatcher(LocalDispatcher):
    """All experts on this rank, no row copy: ``dispatch`` hands x_TD itself to the experts with
    the sort as a gather index and the routing weights as row scales; ``combine`` sums each
    token's rows unweighted. Dropped slots (capacity) are absent from the sort, so no expert row
    reads them and combine skips them, as in ``LocalDispatcher``."""

    def dispatch(self, x_TD: torch.Tensor, route: RouterOutput) -> Tuple[torch.Tensor, DispatchState]:
        meta = self._sort(route)
        slot_N = meta.sort_index_N
        gather_index_N = torch.div(slot_N, meta.top_k, rounding_mode="floor")  # token of a slot
        # The router's weights in sorted order; autograd scatters their grad back to [T, K]
        # (0 for dropped slots, as combine's weight gradient gives them in LocalDispatcher).
        row_scale_N = route.weights_TK.reshape(-1)[slot_N.long()]
        state = DispatchState(meta, meta.offsets_E1, meta.counts_E,
                              gather_index_N=gather_index_N, row_scale_N=row_scale_N)
        return x_TD, state

    def combine(self, y_ND: torch.Tensor, weights_TK: torch.Tensor,
                state: DispatchState) -> torch.Tensor:
        return self.ops.combine(y_ND, None, state.meta)  # the weights scaled the rows already


class AllToAllDispatcher(LocalDispatcher):
    """Experts sharded over Megatron's expert-parallel group."""

    def __init__(self, num_experts: int, ops: MoEOps, group, capacity_factor: Optional[float] = None):
        super().__init__(num_experts, ops, capacity_factor)
        self.group = group
        self.ep = torch.distributed.get_world_size(group)
        self.num_local = num_experts // self.ep

    def _exchange_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """[ep, e] table: row j = rows rank j sends to each of this rank's local experts."""
        send = counts_E.to(torch.int64).view(self.ep, self.num_local).contiguous()
        recv = torch.empty_like(send)
        torch.distributed.all_to_all_single(recv, send, group=self.group)
        return recv

    def dispatch(self, x_TD: torch.Tensor, route: RouterOutput) -> Tuple[torch.Tensor, DispatchState]:
        from megatron.core.tensor_parallel.mappings import all_to_all

        meta = self._sort(route)
        x_ND = self.ops.dispatch(x_TD, meta)
        recv_ej = self._exchange_counts(meta.counts_E)  # [ep, e]
        send_splits = meta.counts_E.view(self.ep, self.num_local).sum(1).tolist()
        recv_splits = recv_ej.sum(1).tolist()
        x_recv = all_to_all(self.group, x_ND, recv_splits, send_splits)
        # Received rows are ordered (source rank, local expert): regroup by local expert with
        # a stable sort, which keeps source-rank order inside each expert (deterministic).
        local_ids = torch.repeat_interleave(
            torch.arange(self.num_local, device=x_TD.device).repeat(self.ep), recv_ej.reshape(-1))
        local_meta = self.ops.dispatch_metadata(local_ids.view(-1, 1).to(torch.int32),
                                                self.num_local)
        x_local = self.ops.dispatch(x_recv, local_meta)
        state = DispatchState(meta, local_meta.offsets_E1, local_meta.counts_E, local_meta,
                              send_splits, recv_splits)
        return x_local, state

    def combine(self, y_local: torch.Tensor, weights_TK: torch.Tensor,
                state: DispatchState) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import all_to_all

        y_recv = self.ops.combine(y_local, None, state.local_meta)  # undo the local regroup
        y_ND = all_to_all(self.group, y_recv, state.send_splits, state.recv_splits)
        return self.ops.combine(y_ND, weights_TK, state.meta)
