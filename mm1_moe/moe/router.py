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

    def param_init(self, name: str) -> ParamInit:
        """How ``weight`` is initialised (``mm1_moe.models.param_init``)."""
        return self._inits[name]

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter > 0:  # Switch Transformer's multiplicative jitter
            noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x_TD = x_TD * noise
        return x_TD.float() @ self.weight.float().t()

    def forward(self, x_TD: torch.Tensor,
                token_mask_T: Optional[torch.Tensor] = None) -> RouterOutput:
        return self.ops.router(self.logits(x_TD), self.top_k, self.order, self.normalize,
                               token_mask_T)
