"""Names Megatron's MoE utilities leave unbound without Transformer Engine (``when: always``).

megatron-core 0.16.1, ``transformer/moe/moe_utils.py``: TE's fused MoE ops and
``te_general_gemm`` are imported in a ``try`` block, and when TE is absent the ``except`` branch
only sets ``HAVE_TE = False``. Every use is guarded by ``HAVE_TE`` except
``RouterGatingLinearFunction.forward`` (``if te_general_gemm is not None and ...``), which then
raises NameError: Megatron's own MoE layer (our parity reference) cannot run without TE.
Binding the missing names to None restores the intended fallback. With TE installed the names
are bound and this binds nothing."""

from __future__ import annotations

import importlib
from typing import List

import torch

from .record import MISSING, Patch, Revert, chain, missing_text, rebind, resolve, source_of

MODULE = "megatron.core.transformer.moe.moe_utils"
UNBOUND_WITHOUT_TE = (
    "fused_compute_score_for_moe_aux_loss",
    "fused_moe_aux_loss",
    "fused_permute",
    "fused_permute_with_probs",
    "fused_sort_chunks_by_index",
    "fused_sort_chunks_by_index_with_probs",
    "fused_topk_with_score_function",
    "fused_unpermute",
    "te_general_gemm",
)


def check() -> List[str]:
    problems = missing_text(f"{MODULE}:RouterGatingLinearFunction.forward",
                            "te_general_gemm is not None")
    module_text = source_of(MODULE)
    problems += [f"{MODULE} now binds {name} = None itself" for name in UNBOUND_WITHOUT_TE
                 if f"{name} = None" in module_text]
    return problems


def apply() -> Revert:
    targets = [f"{MODULE}:{name}" for name in UNBOUND_WITHOUT_TE]
    return chain([rebind(t, None) for t in targets if resolve(t)[2] is MISSING])


def probe() -> None:
    utils = importlib.import_module(MODULE)
    x, w = torch.randn(3, 4), torch.randn(2, 4)
    out = utils.router_gating_linear(x, w, None, torch.float32)
    assert torch.allclose(out, x @ w.t(), atol=1e-6)


PATCH = Patch(
    name="te_unbound_names",
    targets=tuple(f"{MODULE}:{name}" for name in UNBOUND_WITHOUT_TE),
    when="always",
    why="Without Transformer Engine, moe_utils leaves te_general_gemm and the fused MoE ops "
        "unbound and RouterGatingLinearFunction.forward raises NameError on them.",
    check=check,
    apply=apply,
    probe=probe,
)
