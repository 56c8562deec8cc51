"""``carry_optimizer``: start the MoE model's Adam from the dense checkpoint's moments.

The dense checkpoint is loaded with its optimizer in the dense run's dtype (the MoE config must
have the same one: a bf16 run's optimizer state has another format), and each moment tensor goes
through the same map as the weights (``convert.py``):
unchanged for every copied tensor; for an MoE layer, the FFN's exp_avg / exp_avg_sq split into
G shards and copied into every expert like the weights, but not multiplied by the w2 scale (a
heuristic: Adam's update m / sqrt(v) does not depend on a common scale of the gradients, and
the expert gradients' scale changes with the routing anyway); the router's moments start at
zero. Adam's step continues from the dense run's, so its bias correction treats the moments as
the averages they are. The LR schedule starts again (warm-up), as for a fresh optimizer.
In a bf16 run the fp32 main parameters are carried too, through the weights' own map (w2 scale
included): the MoE's main copies continue the dense run's fp32 masters, not the bf16 weights.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from ..config import Config
from ..models.builder import wrap_ddp
from ..training.checkpoint import load_checkpoint
from ..training.optimizer import build_optimizer
from ..training.optimizer_state import MOMENTS, sub_optimizers
from .convert import UpcycleError, UpcyclePlan, upcycle_state_dict


@dataclasses.dataclass
class DenseMoments:
    moments: Dict[str, Dict[str, torch.Tensor]]  # moment name -> global tensor name -> tensor
    step: torch.Tensor
    main_params: Optional[Dict[str, torch.Tensor]] = None  # bf16 runs: the fp32 masters


def _param_pairs(optimizer) -> Iterator[Tuple[torch.nn.Parameter, torch.nn.Parameter, object]]:
    """(model parameter, the parameter Adam updates, the torch optimizer holding its state):
    the same tensor in fp32, the fp32 main copy of a bf16 parameter under mixed precision."""
    for sub in sub_optimizers(optimizer):
        if hasattr(sub, "float16_groups"):
            for model_group, main_group in zip(sub.float16_groups, sub.fp32_from_float16_groups):
                yield from ((m, p, sub.optimizer) for m, p in zip(model_group, main_group))
            for group in sub.fp32_from_fp32_groups:
                yield from ((p, p, sub.optimizer) for p in group)
        else:
            for group in sub.optimizer.param_groups:
                yield from ((p, p, sub.optimizer) for p in group["params"])


def _names(ddp_chunks: List[torch.nn.Module]) -> Dict[int, str]:
    """id(parameter) -> its global name. At TP = PP = 1 (where upcycling runs) a chunk's module
    names are the layer-global names of its sharded state dict."""
    return {id(p): n for chunk in ddp_chunks for n, p in chunk.module.named_parameters()}


def read_dense_optimizer(config: Config, chunks: List[torch.nn.Module], path: str) -> DenseMoments:
    """Load the dense checkpoint ``path`` - weights into ``chunks`` (built in the dense run's
    dtype), and its Adam state (with the fp32 main parameters of a bf16 run)."""
    from ..training.loop import decoder_param_count

    ddp_chunks = wrap_ddp(config, chunks)
    optimizer, scheduler = build_optimizer(config, ddp_chunks, decoder_param_count(config))
    load_checkpoint(path, ddp_chunks, optimizer, scheduler)
    names = _names(ddp_chunks)
    moments: Dict[str, Dict[str, torch.Tensor]] = {m: {} for m in MOMENTS}
    main: Dict[str, torch.Tensor] = {}
    steps = set()
    for model_param, param, torch_opt in _param_pairs(optimizer):
        if param is not model_param:
            main[names[id(model_param)]] = param.detach().float().cpu().clone()
        state = torch_opt.state.get(param, {})
        if not all(m in state for m in MOMENTS) or "step" not in state:
            raise UpcycleError(f"{path} has no Adam state for {names[id(model_param)]} "
                               "(was it saved before the first step?)")
        for m in MOMENTS:
            moments[m][names[id(model_param)]] = state[m].detach().float().cpu().clone()
        steps.add(float(state["step"]))
    return DenseMoments(moments, torch.tensor(max(steps), dtype=torch.float32), main or None)


def carried_state_fn(dense: DenseMoments, plan: UpcyclePlan) -> Callable[[List, object], None]:
    """A ``set_state(ddp_chunks, optimizer)`` that writes the upcycled moments."""
    moment_plan = dataclasses.replace(plan, w2_scale=1.0, router_init="zero")
    upcycled = {m: upcycle_state_dict(dense.moments[m], moment_plan) for m in MOMENTS}
    main = upcycle_state_dict(dense.main_params, plan) if dense.main_params else {}

    def set_state(ddp_chunks, optimizer) -> None:
        names = _names(ddp_chunks)
        for model_param, param, torch_opt in _param_pairs(optimizer):
            name = names[id(model_param)]
            if name not in upcycled["exp_avg"]:
                raise UpcycleError(f"carry_optimizer: no moments for MoE tensor {name}")
            state = torch_opt.state[param]
            for m in MOMENTS:
                state[m] = upcycled[m][name].to(param.device, param.dtype).reshape(param.shape)
            state["step"] = dense.step.clone()
            if param is not model_param and name in main:  # bf16: the fp32 master copy
                param.data.copy_(main[name].reshape(param.shape))

    return set_state
