"""Expert load balancing beyond the per-micro-batch auxiliary loss.

Two remedies (``model.decoder.moe``):

- ``balance: bias|both``: DeepSeek-V3's auxiliary-loss-free balancing. Each MoE layer's router
  holds an fp32 bias [E] that joins the scores only to choose the top-k (``TopKRouter``); after
  every optimizer step ``update_expert_biases`` moves it by ``bias_update_rate`` toward equal
  load. The load is the step's rows per expert, summed over its micro-batches here and over
  the data-parallel group (which holds the expert-parallel ranks: Megatron carves them out of
  it) with ONE all-reduce of a [L, E] table per step for all of a stage's layers. Tensor-
  parallel ranks route the same tokens (``layer.py``) and are not summed.
- ``aux_loss_scope: global_batch``: the load-balancing loss of each micro-batch uses the expert
  loads of the whole step so far (this micro-batch and the earlier ones, over the data-parallel
  group), as Megatron-core's ``global_aux_loss`` does: f_e = G_e / (N K) with G_e the rows sent
  to e and N the tokens, summed over micro-batches 1..m and the data-parallel ranks; the
  probabilities P_e stay this micro-batch's own (they carry the gradient). Costs one all-reduce
  of E + 1 integers per MoE layer per micro-batch. A micro-batch's backward can come before a
  later micro-batch's forward (pipeline schedules), so the loads of later micro-batches cannot
  be known: the running total is what every schedule can compute.

Loads count real tokens only (``padding_mask``), the tokens the aux loss and the metrics count.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, List, Optional

import torch
import torch.distributed as dist

from ..config import MoEConfig
from .backend import RouterOutput, load_balance_loss


class LoadBalanceState:
    """One MoE layer's per-step balance bookkeeping (nothing here is saved: it is reset at the
    start of every step)."""

    def __init__(self, moe: MoEConfig, data_parallel_group) -> None:
        self.moe = moe
        self.group = data_parallel_group
        self.uses_bias = moe.balance in ("bias", "both")
        self.start_step()

    def start_step(self) -> None:
        self.step_load_E: Optional[torch.Tensor] = None  # this rank's rows per expert
        self.global_load: Optional[torch.Tensor] = None  # [E + 1]: rows per expert, tokens
        # The running loads each forward used, for full recompute's rerun in the backward
        # (micro-batches' backwards come in their forwards' order, so first in, first out).
        self._used: Deque[torch.Tensor] = deque()

    def add_step_load(self, stat_counts_E: torch.Tensor) -> None:
        if not self.uses_bias:
            return
        counts = stat_counts_E.detach().to(torch.int64)
        self.step_load_E = counts if self.step_load_E is None else self.step_load_E + counts

    def take_step_load(self, num_experts: int, device: torch.device) -> torch.Tensor:
        load = self.step_load_E
        self.step_load_E = None
        return torch.zeros(num_experts, dtype=torch.int64, device=device) if load is None else load

    def global_batch_loss(self, route: RouterOutput, top_k: int, recomputing: bool) -> torch.Tensor:
        """This micro-batch's load-balancing loss with the step's running global loads (see the
        module docstring). Collective over the data-parallel group, except in a recompute."""
        if recomputing and self._used:
            load = self._used.popleft()
        else:
            local = torch.cat([route.stat_counts_E.detach().to(torch.int64),
                               route.num_stat_tokens.detach().to(torch.int64).reshape(1)])
            if self.group is not None and dist.get_world_size(self.group) > 1:
                dist.all_reduce(local, group=self.group)
            self.global_load = local if self.global_load is None else self.global_load + local
            load = self.global_load.clone()
            if not recomputing and _full_recompute_first_pass():
                self._used.append(load)
        E = route.prob_sum_E.shape[0]
        return load_balance_loss(route.prob_sum_E, route.num_stat_tokens, load[:E], load[E],
                                 top_k)


def _full_recompute_first_pass() -> bool:
    """True in the first (no-grad) forward of a checkpointed region (train.recompute=full),
    which the backward reruns."""
    from megatron.core.tensor_parallel.random import is_checkpointing

    return is_checkpointing() and not torch.is_grad_enabled()


def update_expert_biases(layers: List["torch.nn.Module"], rate: float) -> None:
    """After an optimizer step: sum the step's loads of every bias-balanced MoE layer of this
    stage over the data-parallel group (one all-reduce of a [L, E] table) and move each layer's
    bias (``TopKRouter.update_bias``). Collective over the data-parallel group; a no-op when no
    layer balances by bias (the same on every rank of the group: one stage, one config)."""
    biased = [layer for layer in layers if layer.balance.uses_bias]
    if not biased:
        return
    device = biased[0].router.expert_bias.device
    E = biased[0].router.num_experts
    loads_LE = torch.stack([layer.balance.take_step_load(E, device) for layer in biased])
    group = biased[0].data_parallel_group
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(loads_LE, group=group)
    for layer, load_E in zip(biased, loads_LE):
        layer.router.update_bias(load_E, rate)
