"""The top-k router: a linear gate [E, D] (no bias), fp32 routing math, optional input jitter,
and with ``balance: bias|both`` an expert bias [E] that only steers the top-k choice.

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
        # A buffer (saved and resharded with the router, no grad, no weight decay), fp32
        # whatever train.dtype: steps of 1e-3 would vanish next to bf16's 8-bit mantissa.
        # None (nothing in checkpoints) unless balancing by bias.
        self.register_buffer("expert_bias", torch.zeros(moe.num_experts, dtype=torch.float32)
                             if moe.balance in ("bias", "both") else None)
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

    def route(self, logits_TE: torch.Tensor,
              token_mask_T: Optional[torch.Tensor] = None) -> RouterOutput:
        """The router op on ``logits_TE``, with the expert bias in the top-k choice when on."""
        return self.ops.router(logits_TE, self.top_k, self.order, self.normalize, token_mask_T,
                               bias_E=self.expert_bias)

    def forward(self, x_TD: torch.Tensor,
                token_mask_T: Optional[torch.Tensor] = None) -> RouterOutput:
        return self.route(self.logits(x_TD), token_mask_T)

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor, rate: float) -> None:
        """DeepSeek-V3's update after an optimizer step: every expert's bias moves by ``rate``
        toward equal load (up when below the mean load, down when above, unchanged at it), then
        the biases are re-centred to mean zero (a shift common to all experts changes no top-k
        choice; re-centring keeps them from drifting). ``load_E``: the step's rows per expert
        over every rank that saw different tokens."""
        load = load_E.to(torch.float64)
        step = torch.sign(load.mean() - load).to(self.expert_bias.dtype) * rate
        self.expert_bias.add_(step)
        self.expert_bias.sub_(self.expert_bias.mean())
