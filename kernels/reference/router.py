"""Plain-torch reference of the top-k router (``mm1_moe.kernels.router``): the oracle of its tests
and the baseline of its benchmark.

Shape legend: T tokens, E experts, K top-k.

Semantics (shared with the kernel, which must match the ids bit-exactly):
- order "softmax_topk" (MM1, ST-MoE): p = softmax(logits) over all E; ids = top-k of p;
  weights = p[ids], renormalized to sum 1 per token when ``normalize``.
- order "topk_softmax" (Mixtral): ids = top-k of logits; weights = softmax over the K selected
  logits (sums to 1 by construction; ``normalize`` has no effect).
- Top-k is ranked by the logits in both orders. Softmax is strictly increasing, so this is the
  top-k of p in exact arithmetic; ranking by the logits keeps two distinct logits that round to
  the same fp32 probability from becoming a tie whose winner depends on the exp rounding.
- ids are sorted by value descending; exact ties go to the lower expert index (a stable sort).
- aux (Switch / ST-MoE load balance, Megatron's ``switch_load_balancing_loss_func``): over the n
  tokens kept by ``token_mask_T`` (all if None), f_e = rows routed to e / (n*K),
  P_e = mean full-softmax prob of e; aux = E * sum_e f_e * P_e. Gradient through P_e only.
- z (ST-MoE router z-loss): mean over the kept tokens of logsumexp(logits)^2.
- Tokens with mask False are routed (ids, weights, counts_E) but excluded from aux and z.
  With n == 0 both losses are 0.
- Math in fp32 whatever the logits dtype, in fp64 for fp64 logits (gradcheck).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

ORDERS = ("softmax_topk", "topk_softmax")


def router_reference(logits_TE: torch.Tensor, k: int, order: str, normalize: bool = False,
                     token_mask_T: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ...]:
    """Returns (weights_TK fp32, ids_TK int64, counts_E int64, aux_loss, z_loss); autograd flows
    to ``logits_TE`` through weights, aux_loss and z_loss."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    T, E = logits_TE.shape
    acc = torch.float64 if logits_TE.dtype == torch.float64 else torch.float32
    x_TE = logits_TE.to(acc)
    probs_TE = torch.softmax(x_TE, dim=-1)

    # stable=True: among equal logits the lower expert index comes first.
    ids_TK = torch.sort(x_TE.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    if order == "softmax_topk":
        weights_TK = probs_TE.gather(1, ids_TK)
        if normalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    else:
        weights_TK = torch.softmax(x_TE.gather(1, ids_TK), dim=-1)
    counts_E = torch.bincount(ids_TK.reshape(-1), minlength=E)

    kept_T = (torch.ones(T, dtype=torch.bool, device=logits_TE.device) if token_mask_T is None
              else token_mask_T.to(torch.bool))
    n = kept_T.sum().clamp(min=1).to(acc)  # n == 0: every sum below is 0, so the losses are 0
    stat_counts_E = torch.bincount(ids_TK[kept_T].reshape(-1), minlength=E).to(acc)
    f_E = stat_counts_E / (n * k)
    P_E = (probs_TE * kept_T[:, None]).sum(dim=0) / n
    aux_loss = E * (f_E * P_E).sum()
    lse_T = torch.logsumexp(x_TE, dim=-1)
    z_loss = (lse_T.square() * kept_T).sum() / n
    return weights_TK, ids_TK, counts_E, aux_loss, z_loss
