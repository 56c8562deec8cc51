"""The distributed optimizer loads its checkpoints back with torch's Adam (``when: always``).

Without Apex or Transformer Engine, megatron-core 0.16.1's ``DistributedOptimizer`` wraps
``torch.optim.AdamW``, which keeps a ``step`` tensor per parameter; the checkpoint stores one
shared step in ``param_groups`` instead. Three places in ``distrib_optimizer.py`` (0.16.1 line
numbers) get that wrong, and each fails a load on its own:

1. ``sharded_state_dict(is_loading=True)`` calls ``state_dict()`` (l. 1246), which asserts that
   every parameter has one step (``assert len(steps) == 1``, l. 642); a fresh optimizer has no
   state yet, so loading into a run that has not stepped fails. ``FP32Optimizer`` calls
   ``init_state_fn`` first; the distributed optimizer does not. Replacement: the same call, plus a
   zero ``step`` per parameter (what the load then overwrites).
2. ``load_parameter_state_from_fully_reshardable`` skips ``step`` (l. 2101) but
   ``_set_main_param_and_optimizer_states`` copies every key the destination holds, ``step``
   included (``dst_tensors[key].copy_(tensors[key])``, l. 940): KeyError 'step'. Replacement:
   the destination's own step (already set from ``param_groups``) is passed along.
3. ``load_state_dict`` gives every parameter the same step tensor (``s["step"] = step``,
   l. 825), and torch's Adam adds 1 to each parameter's step in place: after a load the step
   grows by the number of local parameters per iteration, so the bias correction is wrong from
   the first step on. Replacement: each parameter gets its own copy after the load.

With Apex or Transformer Engine (``HAVE_APEX_OR_TE``) the step lives in ``param_groups`` and the
replacements hand straight over to upstream.
"""

from __future__ import annotations

import importlib
from typing import List

import torch

from .record import Patch, Revert, chain, missing_text, rebind, resolve, source_of

MODULE = "megatron.core.optimizer.distrib_optimizer"
CLASS = f"{MODULE}:DistributedOptimizer"
SHARDED = f"{CLASS}.sharded_state_dict"
SET_STATES = f"{CLASS}._set_main_param_and_optimizer_states"
LOAD = f"{CLASS}.load_state_dict"


def _torch_adam() -> bool:
    return not importlib.import_module(MODULE).HAVE_APEX_OR_TE


def _main_state(opt, model_param) -> dict:
    group_index, group_order = opt.model_param_group_index_map[model_param]
    return opt.optimizer.state[opt.optimizer.param_groups[group_index]["params"][group_order]]


def init_fresh_state(opt) -> None:
    """Zero moments (Megatron's ``init_state_fn``) and a step of 0, each parameter its own."""
    opt.init_state_fn(opt.optimizer, opt.config)
    for group in opt.optimizer.param_groups:
        for param in group["params"]:
            opt.optimizer.state[param].setdefault("step", torch.zeros((), dtype=torch.float32))


def unshare_steps(torch_optimizer) -> None:
    """Give every parameter its own ``step`` tensor (a shared one is incremented once per
    parameter per step)."""
    for state in torch_optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def _patched(name: str, original):
    def sharded_state_dict(self, model_sharded_state_dict={}, is_loading=False,  # noqa: B006
                           sharding_type=None, metadata=None):
        if is_loading and _torch_adam() and self.init_state_fn is not None and any(
                "step" not in self.optimizer.state[p]
                for g in self.optimizer.param_groups for p in g["params"]):
            init_fresh_state(self)
        return original(self, model_sharded_state_dict, is_loading, sharding_type, metadata)

    def set_states(self, model_param, tensors):
        if "step" not in tensors and _torch_adam() and \
                not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            step = _main_state(self, model_param).get("step")
            if step is not None:
                tensors = {**tensors, "step": step.clone()}
        return original(self, model_param, tensors)

    def load_state_dict(self, state_dict):
        original(self, state_dict)
        if _torch_adam():
            unshare_steps(self.optimizer)

    replacement = {SHARDED: sharded_state_dict, SET_STATES: set_states,
                   LOAD: load_state_dict}[name]
    replacement.__wrapped__ = original
    replacement.__name__ = replacement.__qualname__ = name.rpartition(".")[2]
    return replacement


def check() -> List[str]:
    problems = (missing_text(f"{CLASS}.state_dict", "assert len(steps) == 1")
                + missing_text(SHARDED, "self.load_state_dict(self.state_dict())")
                + missing_text(f"{CLASS}.load_parameter_state_from_fully_reshardable",
                               'if k == "step":')
                + missing_text(SET_STATES, "dst_tensors[key].copy_(tensors[key])")
                + missing_text(LOAD, 's["step"] = step\n'))
    try:
        if "init_state_fn" in source_of(SHARDED):
            problems.append(f"{SHARDED} now calls init_state_fn itself (part 1 may be redundant)")
    except (OSError, TypeError, AttributeError) as err:
        problems.append(f"{SHARDED}: cannot read its source ({err})")
    return problems


def apply() -> Revert:
    return chain([rebind(target, _patched(target, resolve(target)[2]))
                  for target in (SHARDED, SET_STATES, LOAD)])


class _Stub:
    """The attributes ``_set_main_param_and_optimizer_states`` reads, over a torch AdamW."""

    def __init__(self):
        from types import SimpleNamespace

        self.model_param = torch.nn.Parameter(torch.zeros(3))
        main = torch.nn.Parameter(torch.zeros(3))
        self.optimizer = torch.optim.AdamW([main])
        self.optimizer.state[main].update(exp_avg=torch.zeros(3), exp_avg_sq=torch.zeros(3),
                                          step=torch.tensor(7.0))
        self.model_param_group_index_map = {self.model_param: (0, 0)}
        self.config = SimpleNamespace(use_precision_aware_optimizer_no_fp8_or_ds_fp8=False)


def probe() -> None:
    """The fully-reshardable loader's tensors (no ``step``) land, and the step is kept."""
    if not _torch_adam():
        return
    cls = resolve(SET_STATES)[0]
    stub = _Stub()
    with torch.no_grad():  # as upstream's loaders run it
        cls._set_main_param_and_optimizer_states(
            stub, stub.model_param, {"param": torch.ones(3), "exp_avg": torch.full((3,), 2.0),
                                     "exp_avg_sq": torch.full((3,), 3.0)})
    (main,) = stub.optimizer.param_groups[0]["params"]
    state = stub.optimizer.state[main]
    assert main.tolist() == [1.0] * 3 and state["exp_avg_sq"].tolist() == [3.0] * 3
    assert float(state["step"]) == 7.0


PATCH = Patch(
    name="distopt_adam_step",
    targets=(SHARDED, SET_STATES, LOAD),
    when="always",
    why="Without Apex/TE the distributed optimizer cannot load its checkpoints back: torch "
        "AdamW's per-parameter step is asserted on a fresh optimizer, requested from a loader "
        "that skips it (KeyError 'step'), and shared by all parameters after a load.",
    check=check,
    apply=apply,
    probe=probe,
)
