"""The distributed optimizer finds the right Adam state for each parameter of a bf16 model that
keeps some parameters in fp32 (``when: always``).

``DistributedOptimizer._build_optimizer_group_ranges`` (megatron-core 0.16.1) records each
parameter's (group, order) in the order the grad buffers list them; a bf16 model with fp32
parameters (the router gate, the torch norms: see ``mixed_precision_fp32_params``) has one
buffer per dtype, so a group's order interleaves bf16 and fp32 parameters. The optimizer's
groups are then built as ``[*fp32 shards, *fp32 copies of bf16 shards]``
(``_build_model_and_main_param_groups``), so ``model_param_group_index_map`` points at another
parameter's main copy: every checkpoint save fails (``get_parameter_state_dp_zero``:
``RuntimeError: The size of tensor a (16384) must match the size of tensor b (256)``), and a
load would copy moments into the wrong parameters. Training itself is unaffected (the step uses
the shard groups, not the map).

Replacement: upstream's method, then each group's parameters reordered fp32 first, the rest
after, each part in upstream's order, the map rebuilt from that order, which is the order the
optimizer's groups are built in. With parameters of one dtype nothing moves.
"""

from __future__ import annotations

from typing import List

import torch

from .record import Patch, Revert, missing_text, rebind, resolve

CLASS = "megatron.core.optimizer.distrib_optimizer:DistributedOptimizer"
TARGET = f"{CLASS}._build_optimizer_group_ranges"
BUILD_GROUPS = f"{CLASS}._build_model_and_main_param_groups"


def _fp32_first(upstream: classmethod) -> classmethod:
    func = upstream.__func__

    def build(cls, param_groups, gbuf_ranges):
        index_map, group_ranges = func(cls, param_groups, gbuf_ranges)
        for group_index, group_range in enumerate(group_ranges):
            params = group_range["params"]
            params[:] = ([p for p in params if p.dtype == torch.float32]
                         + [p for p in params if p.dtype != torch.float32])
            for order, param in enumerate(params):
                index_map[param] = (group_index, order)
        return index_map, group_ranges

    build.__wrapped__ = func
    build.__name__, build.__qualname__ = func.__name__, func.__qualname__
    return classmethod(build)


def check() -> List[str]:
    return (missing_text(TARGET, 'local_param_group_map[param] = (group_index, '
                                 'len(group_range["params"]) - 1)')
            + missing_text(BUILD_GROUPS, "*shard_fp32_params_this_group,\n"
                                         "                    "
                                         "*shard_fp32_from_float16_params_this_group,"))


def apply() -> Revert:
    return rebind(TARGET, _fp32_first(resolve(TARGET)[2]))


def probe() -> None:
    """bf16 a, c in one buffer and fp32 b in another, one group: b comes first, as the
    optimizer's group will hold it."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    a, c = (torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16)) for _ in range(2))
    b = torch.nn.Parameter(torch.zeros(3))
    gbuf_ranges = [{torch.bfloat16: [{"param_map": {a: None, c: None}}]},
                   {torch.float32: [{"param_map": {b: None}}]}]
    index_map, ranges = DistributedOptimizer._build_optimizer_group_ranges(
        [{"params": [a, b, c]}], gbuf_ranges)
    assert [id(p) for p in ranges[0]["params"]] == [id(b), id(a), id(c)]
    assert [index_map[p] for p in (b, a, c)] == [(0, 0), (0, 1), (0, 2)]


PATCH = Patch(
    name="distopt_fp32_params_order",
    targets=(TARGET,),
    when="always",
    why="DistributedOptimizer's model_param_group_index_map follows the grad buffers' order, "
        "but its optimizer groups hold fp32 parameters first: in a bf16 model with fp32 "
        "parameters the map names another parameter's Adam state and checkpoints fail.",
    check=check,
    apply=apply,
    probe=probe,
)
