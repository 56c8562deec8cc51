"""The top-k router: a linear gate [E, D] (no bias), fp32 routing math, optional input jitter.

Shapes: T tokens, D width, E experts, K top-k.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..config import MoEConfig
from ..models.param_init import ParamInit, normal
from .backend import MoEOps, RouterOutput


class TopKRouter(torch.nn.Module):
    """logits_TE = x_TD @ weight_ED^T in fp32 (bf16 logits flip near-tied top-2 choices), then
    the router op: top-k ids and weights, per-expert counts, load-balancing and z-loss terms."""

    def __init__(self, hidden_size: int, moe: MoEConfig, ops: MoEOps,
                 params_dtype: torch.dtype = torch.float32, init_std: float = 0.02):
        super().__init__()
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        self.order, self.normalize = moe.router_order, moe.normalize_topk
        self.jitter = moe.router_jitter
        self.ops = ops
        self.weight = torch.nn.Parameter(torch.empty(moe.num_experts, hidden_size,
                                                     dtype=params_dtype))
        self._inits = {"weight": normal(init_std)}
        self._inits["weight"].init_(self.weight)
        self.weight_grad_group = None
        """A process group over which the weight's grad is summed in the backward (set by the
        MoE layer when tensor-parallel ranks route different tokens without sequence
        parallelism); None: Megatron reduces it."""

    def param_init(self, name: str) -> ParamInit:
        """How ``weight`` is initialised (``mm1_moe.models.param_init``)."""
        return self._inits[name]

    def logits(self, x_TD: torch.Tensor, noise_rows: Optional[slice] = None,
               noise_tokens: Optional[int] = None) -> torch.Tensor:
        """``noise_rows`` / ``noise_tokens`` (sequence parallelism): this rank's rows of the jitter
        drawn for all ``noise_tokens`` tokens, so every rank draws what one process would."""
        if self.training and self.jitter > 0:  # Switch Transformer's multiplicative jitter
            shape = x_TD.shape if noise_rows is None else (noise_tokens, x_TD.shape[1])
            noise = torch.empty(shape, dtype=x_TD.dtype, device=x_TD.device).uniform_(
                1.0 - self.jitter, 1.0 + self.jitter)
            x_TD = x_TD * (noise if noise_rows is None else noise[noise_rows])
        weight = self.weight
        if self.weight_grad_group is not None:
            from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

            weight = copy_to_tensor_model_parallel_region(weight, group=self.weight_grad_group)
        return x_TD.float() @ weight.float().t()

    def forward(self, x_TD: torch.Tensor,
                token_mask_T: Optional[torch.Tensor] = None) -> RouterOutput:
        return self.ops.router(self.logits(x_TD), self.top_k, self.order, self.normalize,
                               token_mask_T)
