"""Quiet the warnings Megatron-core prints at import about what we leave out on purpose
(``when: always``).

Importing megatron.core warns that Apex and Transformer Engine are absent (four times, from
``optimizer/__init__.py``, ``optimizer.py``, ``clip_grads.py`` and the FSDP mixed-precision
module) and, per TransformerConfig, that the "full" recompute scope is deprecated and (with
``train.recompute=selective``) that a Transformer Engine core attention may not need
recomputing. We use neither Apex nor TE by design (torch optimizers and norms, our kernels), so
the lines would bury a command's own output. Only those messages are filtered; every other warning shows.
This entry must be applied before megatron.core is first imported to catch the import-time
ones: ``mm1_moe.runtime.setup_process`` applies it first."""

from __future__ import annotations

import warnings
from typing import List

from .record import Patch, Revert, missing_text

MESSAGES = (r".*(Apex|Transformer Engine|full scope is deprecated"
            r"|the core_attn is from transformer_engine).*")
SOURCES = ("megatron.core.optimizer.optimizer", "megatron.core.optimizer.clip_grads")


def check() -> List[str]:
    problems = []
    for module in SOURCES:
        problems += missing_text(module, "Transformer Engine and Apex are not installed")
    return problems + missing_text("megatron.core.transformer.transformer_config",
                                   "full scope is deprecated",
                                   "the core_attn is from transformer_engine")


def apply() -> Revert:
    warnings.filterwarnings("ignore", message=MESSAGES)
    added = warnings.filters[0]

    def revert() -> None:
        if added in warnings.filters:
            warnings.filters.remove(added)
            # invalidate the per-module "already warned" caches (private, hence the guard)
            getattr(warnings, "_filters_mutated", lambda: None)()

    return revert


def probe() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn("Transformer Engine and Apex are not installed. Falling back.", UserWarning)
        warnings.warn("an unrelated warning", UserWarning)
    assert [str(w.message) for w in seen] == ["an unrelated warning"]


PATCH = Patch(
    name="import_warnings",
    targets=("warnings:filters",),
    when="always",
    why="megatron.core warns at import that Apex/Transformer Engine are absent, which we choose; "
        "the lines would bury every command's output.",
    check=check,
    apply=apply,
    probe=probe,
)
