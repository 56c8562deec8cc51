"""Checkpoints of the bf16 optimizer when the model keeps some parameters in fp32
(``when: always``).

In a ``train.dtype=bf16`` model a few parameters stay fp32 on purpose: the MoE router's gate
(fp32 routing math, ``mm1_moe/moe/router.py``) and the norms Megatron builds without Apex/TE
(``WrappedTorchNorm`` ignores ``params_dtype``). Megatron's
``Float16OptimizerWithFloat16Params`` trains them as it should (``fp32_from_fp32_groups``), but
its ``sharded_state_dict`` (megatron-core 0.16.1) numbers the optimizer's parameters by
iterating ``float16_groups`` only, while torch's state ids count every parameter of each group,
fp32 ones included. With one fp32 parameter between bf16 ones every later id points at the
wrong model tensor and the save fails (``AssertionError: Optimizer shape ((4, 64) does not match
model shape ((64, 64))``, the router gate's moments matched to a projection); the
``fp32_from_fp16_params`` list is zipped against all the group's ids and drifts the same way.

A second failure follows on load: a parameter group holding only fp32 parameters (Megatron's
no-weight-decay group: the norms) has an empty ``fp32_from_fp16_params`` list, and
``dist_checkpointing``'s ``extract_matching_values`` drops list positions, so the empty list in
the common part and the tensors of the next group meet at the same index in ``merge``
(``ValueError: Cannot merge two lists with different lengths (0 and 14 ...``).

Replacement: the same ``sharded_state_dict``, with the ids taken from the optimizer's own
``param_groups`` (the fp32 main copy of a bf16 parameter stands for that parameter) and
``fp32_from_fp16_params`` saved as ``{group index: [tensors]}`` for the non-empty groups;
``load_state_dict`` turns that back into upstream's list of lists before upstream's code runs.
The tensor keys in the checkpoint are upstream's.
"""

from __future__ import annotations

import importlib
from typing import List

import torch

from .record import Patch, Revert, chain, missing_text, rebind, resolve

MODULE = "megatron.core.optimizer.optimizer"
CLASS = f"{MODULE}:Float16OptimizerWithFloat16Params"
TARGET = f"{CLASS}.sharded_state_dict"
LOAD = f"{CLASS}.load_state_dict"


def sharded_state_dict(self, model_sharded_state_dict, is_loading: bool = False,
                       metadata=None):
    """Upstream's ``Float16OptimizerWithFloat16Params.sharded_state_dict`` with ids that count
    the fp32 parameters too."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map, make_sharded_optimizer_tensor,
        optim_state_to_sharding_state)

    if is_loading:
        self.init_state_fn(self.optimizer, self.config)
    state_dict = self.state_dict()
    model_of = {id(main): model
                for models, mains in zip(self.float16_groups, self.fp32_from_float16_groups)
                for model, main in zip(models, mains)}
    in_state_order = [model_of.get(id(p), p)
                      for group in self.optimizer.param_groups for p in group["params"]]
    id_to_sharded = get_param_id_to_sharded_param_map(model_sharded_state_dict, in_state_order)
    state_id = {id(p): i for group, saved in zip(self.optimizer.param_groups,
                                                   state_dict["optimizer"]["param_groups"])
                for p, i in zip(group["params"], saved["params"])}
    state_dict["fp32_from_fp16_params"] = {
        group: [make_sharded_optimizer_tensor(id_to_sharded[state_id[id(main)]], main,
                                              prefix="optimizer.state.fp32_param")
                for main in mains]
        for group, mains in enumerate(self.fp32_from_float16_groups) if mains}
    step = self._extract_common_per_param_step(state_dict["optimizer"])
    optim_state_to_sharding_state(state_dict["optimizer"], id_to_sharded, exclude_keys="step")
    if step:
        state_dict["optimizer"]["state"]["common_step"] = step
    return state_dict


def _load_state_dict_with(upstream_load):
    def load_state_dict(self, state_dict):
        """``fp32_from_fp16_params`` back to upstream's list of lists, then upstream's load."""
        saved = state_dict.get("fp32_from_fp16_params")
        if isinstance(saved, dict):
            state_dict["fp32_from_fp16_params"] = [
                saved.get(group, []) for group in range(len(self.fp32_from_float16_groups))]
        return upstream_load(self, state_dict)

    load_state_dict.__wrapped__ = upstream_load
    return load_state_dict


def check() -> List[str]:
    return (missing_text(TARGET, "chain.from_iterable(g for g in self.float16_groups)",
                         "zip(state_group['params'], fp32_group)")
            + missing_text(LOAD, "zip(\n            self.fp32_from_float16_groups, "
                                 "state_dict[fp32_from_float16_params_key]"))


def apply() -> Revert:
    upstream_load = resolve(LOAD)[2]
    return chain([rebind(TARGET, sharded_state_dict),
                  rebind(LOAD, _load_state_dict_with(upstream_load))])


def probe() -> None:
    """A bf16, an fp32 and a bf16 parameter of different shapes in one group: every saved
    tensor lands on its own parameter's sharded key and shape."""
    from megatron.core.dist_checkpointing import ShardedTensor

    cls = importlib.import_module(MODULE).Float16OptimizerWithFloat16Params
    model = [torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.bfloat16)),
             torch.nn.Parameter(torch.zeros(4)),
             torch.nn.Parameter(torch.zeros(5, 1, dtype=torch.bfloat16))]
    mains = [model[0].detach().float(), model[2].detach().float()]
    opt = cls.__new__(cls)
    opt.optimizer = torch.optim.AdamW([mains[0], model[1], mains[1]])
    for p in opt.optimizer.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.optimizer.step()
    opt.float16_groups, opt.fp32_from_float16_groups = [[model[0], model[2]]], [mains]
    opt.grad_scaler, opt.init_state_fn, opt.config = None, None, None
    sharded = {f"w{i}": ShardedTensor.from_rank_offsets(f"w{i}", p, replica_id=0)
               for i, p in enumerate(model)}
    out = opt.sharded_state_dict(sharded)
    assert [t.key for t in out["fp32_from_fp16_params"][0]] == \
        ["optimizer.state.fp32_param.w0", "optimizer.state.fp32_param.w2"]
    assert cls.load_state_dict.__wrapped__ is not None
    for i, state in out["optimizer"]["state"].items():
        if i != "common_step":
            assert state["exp_avg"].key == f"optimizer.state.exp_avg.w{i}", state["exp_avg"].key
            assert tuple(state["exp_avg"].data.shape) == tuple(model[i].shape)


PATCH = Patch(
    name="mixed_precision_fp32_params",
    targets=(TARGET, LOAD),
    when="always",
    why="Float16OptimizerWithFloat16Params.sharded_state_dict numbers the optimizer's "
        "parameters over float16_groups only, so a bf16 model with fp32 parameters (router "
        "gate, torch norms) saves moments under the wrong parameter and fails its shape check; "
        "a group of fp32 parameters only leaves an empty list that dist_checkpointing's merge "
        "then misaligns on load.",
    check=check,
    apply=apply,
    probe=probe,
)
