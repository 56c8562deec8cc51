"""The MoE hot path's ops, from our Triton kernels or from their plain-torch references.

``kernels.moe: triton`` (the default) runs ``mm1_moe.kernels`` (compiled on GPUs, interpreted on
CPU); ``kernels.moe: torch`` runs ``mm1_moe.kernels.reference``, for debugging and as the
baseline. Both return the same records (``RouterOutput``, ``DispatchMeta``), so the layer never
knows which ran. Modules never import triton: they call these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..kernels.combine import combine as _combine_triton
from ..kernels.dispatch import DispatchMeta
from ..kernels.dispatch import dispatch as _dispatch_triton
from ..kernels.dispatch import dispatch_metadata as _metadata_triton
from ..kernels.experts import swiglu_experts as _swiglu_triton
from ..kernels.reference.dispatch import combine_ref, dispatch_metadata_ref, dispatch_ref
from ..kernels.reference.experts import swiglu_experts_reference
from ..kernels.reference.router import router_reference_parts
from ..kernels.router import RouterOutput, check_bias, load_balance_loss
from ..kernels.router import router as _router_triton
from ..runtime.process import kernel_for

__all__ = ["MoEOps", "DispatchMeta", "RouterOutput", "load_balance_loss", "moe_ops"]


def _router_torch(logits_TE, k, order, normalize=False, token_mask_T=None, *,
                  bias_E=None) -> RouterOutput:
    check_bias(bias_E, logits_TE.shape[1])
    parts = router_reference_parts(logits_TE, k, order, normalize, token_mask_T, bias_E)
    return RouterOutput(parts.weights_TK, parts.ids_TK.to(torch.int32),
                        parts.counts_E.to(torch.int32), parts.aux_loss, parts.z_loss,
                        parts.stat_counts_E.to(torch.int32), parts.num_stat_tokens,
                        parts.prob_sum_E)


@dataclass(frozen=True)
class MoEOps:
    """One backend's five ops (signatures as in ``mm1_moe.kernels``)."""

    name: str
    router: Callable[..., RouterOutput]
    dispatch_metadata: Callable[..., DispatchMeta]
    dispatch: Callable[[torch.Tensor, DispatchMeta], torch.Tensor]
    combine: Callable[[torch.Tensor, Optional[torch.Tensor], DispatchMeta], torch.Tensor]
    swiglu_experts: Callable[..., torch.Tensor]


_BACKENDS = {
    "triton": MoEOps("triton", _router_triton, _metadata_triton, _dispatch_triton,
                     _combine_triton, _swiglu_triton),
    "torch": MoEOps("torch", _router_torch, dispatch_metadata_ref, dispatch_ref, combine_ref,
                    swiglu_experts_reference),
}


def moe_ops(name: str) -> MoEOps:
    name = kernel_for("moe", name)  # auto: as the runtime chose when it started
    if name not in _BACKENDS:
        raise ValueError(f"kernels.moe ({name!r}) must be one of {sorted(_BACKENDS)}")
    return _BACKENDS[name]
