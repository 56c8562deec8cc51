"""Fixes for upstream Megatron-core bugs that hit us on every device (GPU and CPU alike).

megatron-core 0.16.1, ``transformer/moe/moe_utils.py``: Transformer Engine's fused MoE ops and
``te_general_gemm`` are imported in a ``try`` block, and when TE is absent the names are never
bound. Every use is guarded by ``HAVE_TE`` except ``RouterGatingLinearFunction.forward``
(``if te_general_gemm is not None and ...``), which raises NameError: Megatron's own MoE layer
cannot run without TE. Binding the missing names to None restores the intended fallback.
"""

from __future__ import annotations

import importlib

# module -> names its TE-optional import block leaves unbound when TE is absent.
UNBOUND_WITHOUT_TE = {
    "megatron.core.transformer.moe.moe_utils": (
        "fused_compute_score_for_moe_aux_loss",
        "fused_moe_aux_loss",
        "fused_permute",
        "fused_permute_with_probs",
        "fused_sort_chunks_by_index",
        "fused_sort_chunks_by_index_with_probs",
        "fused_topk_with_score_function",
        "fused_unpermute",
        "te_general_gemm",
    ),
}


def apply_megatron_fixes() -> None:
    """Idempotent; a no-op when Transformer Engine is installed (the names are then bound)."""
    for module_name, names in UNBOUND_WITHOUT_TE.items():
        module = importlib.import_module(module_name)
        for name in names:
            if not hasattr(module, name):
                setattr(module, name, None)
