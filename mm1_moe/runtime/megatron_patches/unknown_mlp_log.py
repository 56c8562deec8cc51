"""Silence Megatron's "Unknown MLP type" log line for our MoE layer (``when: always``).

``TransformerLayer`` logs a warning for any MLP submodule class it did not write; ours
(``mm1_moe.moe.MoELayer``) is one by design, and the line would repeat once per MoE layer of
every model built. Only records starting with that text are dropped."""

from __future__ import annotations

import logging
from typing import List

from .record import Patch, Revert, missing_text

LOGGER = "megatron.core.transformer.transformer_layer"
MEGATRON_LOGGER = logging.getLogger(LOGGER)  # a module attribute, so the target can name it


class HideUnknownMLPType(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("Unknown MLP type")


def check() -> List[str]:
    return missing_text(LOGGER, "Unknown MLP type")


def apply() -> Revert:
    hide = HideUnknownMLPType()
    MEGATRON_LOGGER.addFilter(hide)
    return lambda: MEGATRON_LOGGER.removeFilter(hide)


def probe() -> None:
    record = logging.LogRecord(LOGGER, logging.WARNING, __file__, 0,
                               "Unknown MLP type: <class 'MoELayer'>", None, None)
    assert not MEGATRON_LOGGER.filter(record)


PATCH = Patch(
    name="unknown_mlp_log",
    targets=(f"{__name__}:MEGATRON_LOGGER.filters",),
    when="always",
    why="TransformerLayer logs 'Unknown MLP type' once per layer for any MLP it did not write; "
        "our MoELayer is one by design.",
    check=check,
    apply=apply,
    probe=probe,
)
