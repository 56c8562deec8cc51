"""Parameter counts read off the real module tree, built on the ``meta`` device (no memory, no
initialisation: a 64B-parameter MoE decoder builds in well under a second). ``mm1-moe info``
prints these next to its formula, and the tests require the two to agree."""

from __future__ import annotations

import copy
import dataclasses
from typing import Dict

import torch

from ..config import Config


def _single_process_copy(config: Config) -> Config:
    """The same model on one process: counting does not depend on the layout."""
    single = copy.deepcopy(config)
    single.parallel = type(config.parallel)()
    single.train.dtype = "fp32"
    return single


def decoder_param_counts_from_modules(config: Config) -> Dict[str, int]:
    """{"dense", "experts", "routers", "total"} of the decoder as built. Starts (and stops) a
    one-process runtime when none is running."""
    import torch.distributed as dist

    from ..config.megatron import decoder_transformer_config
    from ..moe import GroupedSwiGLUExperts, TopKRouter
    from ..runtime import initialize, shutdown
    from .decoder import build_decoder

    single = _single_process_copy(config)
    started = not dist.is_initialized()
    if started:
        initialize(single)
    try:
        tc = dataclasses.replace(decoder_transformer_config(single, use_cpu_initialization=True),
                                 perform_initialization=False)
        with torch.device("meta"):
            model = build_decoder(single, tc)
        experts = sum(p.numel() for m in model.modules() if isinstance(m, GroupedSwiGLUExperts)
                      for p in m.parameters())
        routers = sum(p.numel() for m in model.modules() if isinstance(m, TopKRouter)
                      for p in m.parameters())
        total = sum(p.numel() for p in model.parameters())
    finally:
        if started:
            shutdown()
    return {"dense": total - experts - routers, "experts": experts, "routers": routers,
            "total": total}
