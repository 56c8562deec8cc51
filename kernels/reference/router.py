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
- Expert bias (``bias_E``, DeepSeek-V3's aux-loss-free balancing): the top-k is chosen by
  p + b (softmax_topk) or logits + b (topk_softmax), ties to the lower index; the weights are
  those of the unbiased scores. Without a bias the ranking is by the logits, as above.
- Math in fp32 whatever the logits dtype, in fp64 for fp64 logits (gradcheck).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

ORDERS = ("softmax_topk", "topk_softmax")


class RouterParts(NamedTuple):
    weights_TK: torch.Tensor
    ids_TK: torch.Tensor
    counts_E: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    prob_sum_E: torch.Tensor  # kept tokens' softmax summed per expert (differentiable)
    stat_counts_E: torch.Tensor  # rows per expert from kept tokens
    num_stat_tokens: torch.Tensor  # kept tokens, 0-d int64


def router_reference(logits_TE: torch.Tensor, k: int, order: str, normalize: bool = False,
                     token_mask_T: Optional[torch.Tensor] = None,
                     bias_E: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, ...]:
    """Returns (weights_TK fp32, ids_TK int64, counts_E int64, aux_loss, z_loss); autograd flows
    to ``logits_TE`` through weights, aux_loss and z_loss."""
    return tuple(router_reference_parts(logits_TE, k, order, normalize, token_mask_T,
                                        bias_E)[:5])


def router_reference_parts(logits_TE: torch.Tensor, k: int, order: str, normalize: bool = False,
                           token_mask_T: Optional[torch.Tensor] = None,
                           bias_E: Optional[torch.Tensor] = None) -> RouterParts:
    """``router_reference`` with the statistics the MoE layer also needs."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    T, E = logits_TE.shape
    acc = torch.float64 if logits_TE.dtype == torch.float64 else torch.float32
    x_TE = logits_TE.to(acc)
    probs_TE = torch.softmax(x_TE, dim=-1)

    key_TE = x_TE.detach()
    if bias_E is not None:
        key_TE = (key_TE if order == "topk_softmax" else probs_TE.detach()) + bias_E.to(acc)
    # stable=True: among equal keys the lower expert index comes first.
    ids_TK = torch.sort(key_TE, dim=-1, descending=True, stable=True).indices[:, :k]
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
    prob_sum_E = (probs_TE * kept_T[:, None]).sum(dim=0)
    aux_loss = E * (f_E * (prob_sum_E / n)).sum()
    lse_T = torch.logsumexp(x_TE, dim=-1)
    z_loss = (lse_T.square() * kept_T).sum() / n
    return RouterParts(weights_TK, ids_TK, counts_E, aux_loss, z_loss, prob_sum_E,
                       stat_counts_E.to(torch.int64), kept_T.sum())
