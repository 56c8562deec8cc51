"""The MoE FFN as a Megatron-core MLP submodule: route -> dispatch -> experts -> combine.

Shapes: S sequence, B batch, T = S*B tokens, D width, E experts, e local experts, K top-k.

Plugs into a ``TransformerLayer`` spec as ``mlp`` (see ``mm1_moe/models/decoder.py``); Megatron's
own ``MoELayer`` is not forked. The auxiliary losses (load balance x aux_loss_coeff, router
z-loss x z_loss_coeff) join the backward through ``AuxLossInjector`` on the layer output, scaled
by ``aux_loss_scale`` (the trainer sets 1 / micro-batches, as Megatron scales the LM loss).
Routing statistics cover real tokens only: Megatron passes ``padding_mask`` ([B, S], True for
tokens to count) down from ``GPTModel.forward``; image placeholders and padding are False.

At expert-parallel size 1 dispatch copies no rows (``GatherDispatcher``, ``fuse_dispatch=True``,
the default): the experts read x_TD through the sort and apply the routing weight, and combine
sums unweighted. ``fuse_dispatch=False`` keeps the copy-then-weighted-combine path
(``LocalDispatcher``), the fused path's baseline in tests and benchmarks. EP > 1 always copies
(rows must be contiguous per destination rank for the all-to-all).

Under tensor parallelism each TP rank routes and computes only its S/tp of the tokens
(``sequence_parallel.py``): with sequence parallelism they arrive split; without it the layer
takes its slice at the input and gathers its output. Routing itself is one process's over all
tokens (gathered logits), so the losses and statistics do not depend on the layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from ..config import MoEConfig
from .backend import RouterOutput, moe_ops
from .balance import LoadBalanceState
from .dispatcher import AllToAllDispatcher, DispatchState, GatherDispatcher, LocalDispatcher
from .experts import GroupedSwiGLUExperts
from .router import TopKRouter
from .sequence_parallel import gather_rows, local_token_mask, rank_rows, rank_sizes


class AuxLossInjector(torch.autograd.Function):
    """Identity on ``output``; in the backward, gives ``aux_loss`` the gradient ``scale``, so the
    auxiliary losses train the router without being added to the returned LM loss."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: float):
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


@dataclass(frozen=True)
class MoEMetrics:
    """Routing statistics of one layer over the forwards since the last read."""

    tokens_per_expert_E: torch.Tensor  # rows each expert received from real tokens
    dropped: int  # routed slots dropped by the capacity limit
    aux_loss: float  # load-balancing loss (before its coefficient), mean over forwards
    z_loss: float  # router z-loss (before its coefficient), mean over forwards
    expert_bias_E: Optional[torch.Tensor] = None  # balance: bias|both, after the step's update

    def summary(self) -> Dict[str, float]:
        """min, max, coefficient of variation and max/mean of tokens per expert (the busiest
        expert sets the pace of an expert-parallel step: max/mean 2 is a step at half speed),
        dropped slots, aux, z, and the expert bias's range when balancing by bias."""
        counts = self.tokens_per_expert_E.double()
        mean = counts.mean()
        cv = float(counts.std(unbiased=False) / mean) if mean > 0 else 0.0
        out = {"load_min": float(counts.min()), "load_max": float(counts.max()),
               "load_cv": cv, "load_max_over_mean": float(counts.max() / mean) if mean > 0
               else 0.0, "dropped": float(self.dropped), "aux_loss": self.aux_loss,
               "z_loss": self.z_loss}
        if self.expert_bias_E is not None:
            out["bias_min"] = float(self.expert_bias_E.min())
            out["bias_max"] = float(self.expert_bias_E.max())
        return out


class _MetricsAccumulator:
    """Sums statistics on the device across micro-batches; nothing syncs until ``read``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.counts, self.aux, self.z, self.dropped, self.forwards = None, 0.0, 0.0, 0, 0

    def add(self, route: RouterOutput, dropped: int) -> None:
        counts = route.stat_counts_E.detach().to(torch.int64)
        self.counts = counts if self.counts is None else self.counts + counts
        self.aux = self.aux + route.aux_loss.detach()
        self.z = self.z + route.z_loss.detach()
        self.dropped += int(dropped)
        self.forwards += 1

    def read(self, expert_bias_E: Optional[torch.Tensor] = None) -> Optional[MoEMetrics]:
        if not self.forwards:
            return None
        n = self.forwards
        bias = None if expert_bias_E is None else expert_bias_E.detach().cpu().clone()
        out = MoEMetrics(self.counts, self.dropped, float(self.aux) / n, float(self.z) / n, bias)
        self.reset()
        return out


class MoELayer(MegatronModule):
    """Top-k routed SwiGLU experts, sharded over the expert-parallel group."""

    def __init__(self, config: TransformerConfig, moe: MoEConfig, kernels: str = "triton",
                 ffn_hidden_size: Optional[int] = None, submodules=None, layer_number=None,
                 pg_collection=None, tp_group=None, fuse_dispatch: bool = True,
                 recompute_activation: bool = False):
        """``recompute_activation`` (train.recompute=selective): the experts rerun fc1 and the
        SwiGLU in the backward; routing and the all-to-all are never rerun."""
        super().__init__(config=config)
        from megatron.core import parallel_state as ps

        self.moe, self.layer_number = moe, layer_number
        ops = moe_ops(kernels)
        ep, ep_rank = ps.get_expert_model_parallel_world_size(), ps.get_expert_model_parallel_rank()
        self.router = TopKRouter(config.hidden_size, moe, ops, torch.float32, config.init_method_std)
        # Tensor parallelism: each TP rank routes and computes only its S/tp tokens
        # (moe/sequence_parallel.py), so the router weight's grad is partial per TP rank. With
        # sequence parallelism the tokens arrive split and Megatron sums that grad over TP (the
        # sequence_parallel attribute); without it the layer splits them itself at its input
        # and gathers its output, and sums the router grad in the backward (Megatron sums
        # sequence_parallel-tagged grads only when sequence parallelism is on).
        self.sp_group, self.split_at_boundary = None, False
        if ps.get_tensor_model_parallel_world_size() > 1:
            self.sp_group = ps.get_tensor_model_parallel_group()
            self.split_at_boundary = not config.sequence_parallel
            if config.sequence_parallel:
                setattr(self.router.weight, "sequence_parallel", True)
            else:
                self.router.weight_grad_group = self.sp_group
        self.experts = GroupedSwiGLUExperts(
            moe.num_experts // ep, config.hidden_size, ffn_hidden_size or config.ffn_hidden_size,
            ops, config.params_dtype, config.init_method_std, config.num_layers, ep_rank, ep,
            recompute_activation=recompute_activation)
        if ep > 1:
            self.dispatcher = AllToAllDispatcher(moe.num_experts, ops,
                                                 ps.get_expert_model_parallel_group(),
                                                 moe.capacity_factor)
        else:
            local = GatherDispatcher if fuse_dispatch else LocalDispatcher
            self.dispatcher = local(moe.num_experts, ops, moe.capacity_factor)
        self.aux_loss_scale = 1.0
        self.metrics = _MetricsAccumulator()
        self.data_parallel_group = ps.get_data_parallel_group()
        self.balance = LoadBalanceState(self.moe, self.data_parallel_group)

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    # --- the four stages -------------------------------------------------------------------
    def route(self, x_TD: torch.Tensor, token_mask_T: Optional[torch.Tensor]) -> RouterOutput:
        """Routing of this rank's tokens. Under sequence parallelism the per-token fields
        (weights, ids, counts) are this rank's and the losses and statistics are those of all
        the TP group's tokens, exactly as one process would route them."""
        if self.sp_group is None:
            return self.router(x_TD, token_mask_T)
        sizes = [x_TD.shape[0]] * self.sp_group.size()
        if self.moe.masked_tokens == "pass_through" and token_mask_T is None:
            sizes = rank_sizes(x_TD.shape[0], self.sp_group, x_TD.device)  # kept tokens differ
        rows = rank_rows(sizes, self.sp_group)
        logits_TE = gather_rows(self.router.logits(x_TD, rows, sum(sizes)), sizes, self.sp_group)
        if token_mask_T is not None:
            token_mask_T = gather_rows(token_mask_T, sizes, self.sp_group)
        route = self.router.route(logits_TE, token_mask_T)
        ids_TK = route.ids_TK[rows]
        counts_E = torch.bincount(ids_TK.reshape(-1).long(), minlength=self.moe.num_experts)
        return dataclasses.replace(route, weights_TK=route.weights_TK[rows], ids_TK=ids_TK,
                                   counts_E=counts_E.to(torch.int32))

    def dispatch(self, x_TD: torch.Tensor, route: RouterOutput) -> Tuple[torch.Tensor, DispatchState]:
        return self.dispatcher.dispatch(x_TD, route)

    def run_experts(self, x_rows: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """x_rows: x_ND, or x_TD read through ``state.gather_index_N`` (``GatherDispatcher``)."""
        return self.experts(x_rows, state.offsets_e1, state.gather_index_N, state.row_scale_N)

    def combine(self, y_ND: torch.Tensor, route: RouterOutput, state: DispatchState) -> torch.Tensor:
        return self.dispatcher.combine(y_ND, route.weights_TK, state)

    # ---------------------------------------------------------------------------------------
    def forward(self, hidden_SBD: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                **_unused):
        if self.split_at_boundary:  # every TP rank holds all tokens: keep this rank's S/tp
            if hidden_SBD.shape[0] % self.sp_group.size():
                raise ValueError(f"MoE under tensor parallelism splits the sequence: length "
                                 f"{hidden_SBD.shape[0]} is not divisible by "
                                 f"{self.sp_group.size()} tensor-parallel ranks")
            out_SBD, bias = self._forward(
                scatter_to_sequence_parallel_region(hidden_SBD, group=self.sp_group), padding_mask)
            # Backward: this rank's rows of the gradient (every rank computed the same after
            # the MoE), not a reduce-scatter.
            return gather_from_sequence_parallel_region(
                out_SBD, tensor_parallel_output_grad=False, group=self.sp_group), bias
        return self._forward(hidden_SBD, padding_mask)

    def _forward(self, hidden_SBD: torch.Tensor, padding_mask: Optional[torch.Tensor]):
        S, B, D = hidden_SBD.shape
        x_TD = hidden_SBD.reshape(S * B, D)
        token_mask_T = None
        if padding_mask is not None:  # [B, S], True = a real token; tokens are S-major
            token_mask_T = padding_mask.transpose(0, 1).reshape(-1).bool()
            if self.sp_group is not None:  # the mask covers the whole sequence
                token_mask_T = local_token_mask(token_mask_T, S * B, self.sp_group)
        if token_mask_T is not None and self.moe.masked_tokens == "pass_through":
            keep_T = token_mask_T.nonzero().squeeze(1)  # one sync: the kept count sizes rows
            out_TD = torch.zeros_like(x_TD).index_copy(0, keep_T, self._moe(x_TD[keep_T], None))
        else:
            out_TD = self._moe(x_TD, token_mask_T)
        out_TD = out_TD.to(hidden_SBD.dtype)
        return out_TD.view(S, B, D), None

    def _moe(self, x_TD: torch.Tensor, token_mask_T: Optional[torch.Tensor]) -> torch.Tensor:
        route = self.route(x_TD, token_mask_T)
        x_rows, state = self.dispatch(x_TD, route)
        y_ND = self.run_experts(x_rows, state)
        out_TD = self.combine(y_ND, route, state)
        recomputing = _recomputing()  # full recompute reruns this forward in the backward
        aux = self.moe.z_loss_coeff * route.z_loss
        if self.moe.balance != "bias":  # "bias" alone: the aux loss is reported, not trained on
            balance_loss = route.aux_loss
            if self.training and self.moe.aux_loss_scope == "global_batch":
                balance_loss = self.balance.global_batch_loss(route, self.router.top_k,
                                                              recomputing)
            aux = aux + self.moe.aux_loss_coeff * balance_loss
        if self.training and aux.requires_grad:
            out_TD = AuxLossInjector.apply(out_TD, aux, float(self.aux_loss_scale))
        if not recomputing:  # count each forward once
            self.metrics.add(route, self._dropped(state.meta.num_dropped))
            if self.training:
                self.balance.add_step_load(route.stat_counts_E)
        return out_TD

    def _dropped(self, dropped_here: int) -> int:
        """Slots the capacity limit dropped, over the TP group's tokens under sequence
        parallelism (each rank drops from its own tokens)."""
        if self.sp_group is None or self.moe.capacity_factor is None:
            return dropped_here
        total = torch.tensor([int(dropped_here)], dtype=torch.int64,
                             device=self.router.weight.device)
        torch.distributed.all_reduce(total, group=self.sp_group)
        return int(total)


def _recomputing() -> bool:
    """True in the backward's rerun of a checkpointed forward (train.recompute=full): Megatron's
    ``CheckpointFunction`` runs the first forward without grad and the rerun with it."""
    from megatron.core.tensor_parallel.random import is_checkpointing

    return is_checkpointing() and torch.is_grad_enabled()
