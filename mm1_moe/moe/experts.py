"""Grouped SwiGLU experts: all of this rank's experts in one grouped GEMM per projection.

Shapes: T tokens, N rows (expert-sorted), D width, F expert FFN width, e local experts.
  w1_eDF2: [gate | up] along the last dim; w2_eFD. Expert ``i`` of this rank is global expert
  ``ep_rank * e + i``; the sharded state dict says so, so checkpoints reshard across EP sizes.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..models.param_init import ParamInit, normal
from .backend import MoEOps


class GroupedSwiGLUExperts(torch.nn.Module):
    def __init__(self, num_local_experts: int, hidden_size: int, ffn_hidden_size: int,
                 ops: MoEOps, params_dtype: torch.dtype = torch.float32, init_std: float = 0.02,
                 num_layers: int = 1, ep_rank: int = 0, ep_size: int = 1,
                 recompute_activation: bool = False):
        """Each rank of an expert-data-parallel group computes its experts on different tokens
        (tensor-parallel ranks split the sequence at the MoE, moe/sequence_parallel.py), so
        Megatron's DDP sum over that group is the whole batch's gradient.
        ``recompute_activation`` (train.recompute=selective): fc1 and the SwiGLU rerun in the
        backward instead of keeping gate_up_NF2 (the ops' ``recompute_fc1``)."""
        super().__init__()
        self.recompute_activation = recompute_activation
        e, D, F = num_local_experts, hidden_size, ffn_hidden_size
        self.ops, self.ep_rank, self.ep_size = ops, ep_rank, ep_size
        self.w1 = torch.nn.Parameter(torch.empty(e, D, 2 * F, dtype=params_dtype))
        self.w2 = torch.nn.Parameter(torch.empty(e, F, D, dtype=params_dtype))
        # w2 is the output projection of a residual branch: Megatron's scaled init (its
        # output_layer_init_method), std / sqrt(2 L).
        self._inits = {"w1": normal(init_std), "w2": normal(init_std / math.sqrt(2.0 * num_layers))}
        for name, spec in self._inits.items():
            spec.init_(getattr(self, name))
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        for p in (self.w1, self.w2):
            p.allreduce = False  # Megatron DDP: reduce over the expert-data-parallel group
            # Not a copy of another tensor-parallel rank's tensor (each holds its own experts):
            # without this, Megatron's grad norm skips the experts of TP ranks other than 0.
            set_tensor_model_parallel_attributes(p, True, 0, 1)

    def param_init(self, name: str) -> ParamInit:
        """How ``name`` (w1 or w2) is initialised (``mm1_moe.models.param_init``)."""
        return self._inits[name]

    def forward(self, x: torch.Tensor, offsets_e1: torch.Tensor,
                gather_index_N: Optional[torch.Tensor] = None,
                row_scale_N: Optional[torch.Tensor] = None) -> torch.Tensor:
        """y_ND from x_ND (expert-sorted rows), or from x_TD with ``gather_index_N`` (the token of
        each sorted row); output rows scaled by ``row_scale_N`` when given."""
        return self.ops.swiglu_experts(x, self.w1, self.w2, offsets_e1, gather_index_N,
                                       row_scale_N, recompute_fc1=self.recompute_activation)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None):
        """Expert weights as slices [ep_rank * e, (ep_rank + 1) * e) of global [E, ...] tensors
        (after any stacked-layer axes Megatron prepends)."""
        from megatron.core import parallel_state as ps
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        replica = (0, 0, ps.get_expert_data_parallel_rank())
        axis = len(sharded_offsets)
        return {
            f"{prefix}{name}": ShardedTensor.from_rank_offsets(
                f"{prefix}{name}", param, *sharded_offsets,
                (axis, self.ep_rank, self.ep_size), replica_id=replica,
                prepend_axis_num=axis)
            for name, param in (("w1", self.w1), ("w2", self.w2))
        }
