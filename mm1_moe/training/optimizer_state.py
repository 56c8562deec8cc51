"""Adam's state across optimizer kinds: loading a checkpoint written by the other kind
(distributed <-> not), and reading the state out by global tensor name.

Both kinds save Adam's moments the same way in ``dist_checkpointing``: one tensor per model
tensor, in model space (``chained_0.optimizer.state.exp_avg.<model key>``, sharded like the model
tensor), so the moments reshard across TP/EP/DP and across kinds as they are. What differs:

- the main (fp32) parameters: the distributed optimizer saves them as ``optimizer.state.param.*``,
  the mixed-precision one as ``optimizer.state.fp32_param.*``, the fp32 one not at all (its
  main parameters are the model's). A request the checkpoint lacks is pointed at the other
  kind's name, or filled from the loaded model tensor (:func:`redirect_missing_tensors`).
- the step and the layout of the non-tensor part: the distributed optimizer keeps
  ``{"optimizer": {"param_groups": [{..., "step"}]}, "param_state": ...}``, the other
  ``{"state": {..., "common_step"}, "param_groups": ...}`` (``common_step`` absent at step 0).
  :func:`as_loading_format` rebuilds the loading optimizer's own layout around the loaded
  tensors and carries the step over.

:func:`adam_state_pieces` and :func:`merge_adam_state` read the moments and step back as whole
tensors by name, whatever the kind and layout (the resharding tests compare them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from ..models.init import model_sharded_state_dict

STATE = "optimizer.state."
# a main-parameter tensor the checkpoint lacks -> its name in the other optimizer kind's
ALIASES = {"param": ("fp32_param",), "fp32_param": ("param",)}
MOMENTS = ("exp_avg", "exp_avg_sq")


def sub_optimizers(optimizer) -> List:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_distributed(sub) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(sub, DistributedOptimizer)


def _sharded_items(tree) -> Iterable:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return (v for v in nested_values(tree) if isinstance(v, (ShardedTensor, ShardedTensorFactory)))


def redirect_missing_tensors(sharded_optimizer_state, saved_keys) -> None:
    """In place: each requested main-parameter tensor that ``saved_keys`` lacks is asked for
    under its name in a checkpoint of the other optimizer kind; when the checkpoint has none (an
    fp32 run on the plain optimizer, whose main parameters are the model's), it is not asked for
    and :func:`as_loading_format` takes the loaded model tensor instead."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import (LocalNonpersistentObject, ShardedTensor,
                                                          ShardedTensorFactory)

    def redirect(item):
        if not isinstance(item, (ShardedTensor, ShardedTensorFactory)) or item.key in saved_keys:
            return item
        prefix, sep, rest = item.key.partition(STATE)
        kind, _, model_key = rest.partition(".")
        for alias in ALIASES.get(kind, ()) if sep else ():
            key = f"{prefix}{STATE}{alias}.{model_key}"
            if key in saved_keys:
                item.key = key
                return item
        return LocalNonpersistentObject(None) if sep and kind == "param" else item

    dict_list_map_inplace(redirect, sharded_optimizer_state)


def _take_loaded(request, loaded):
    """``request`` with each sharded tensor replaced by the tensor loaded at its place (and
    its local, never saved, values unwrapped, as ``dist_checkpointing.load`` does)."""
    from megatron.core.dist_checkpointing.mapping import (LocalNonpersistentObject, ShardedBase,
                                                          ShardedTensorFactory)

    if isinstance(request, (ShardedBase, ShardedTensorFactory)):
        return loaded
    if isinstance(request, LocalNonpersistentObject):
        return request.unwrap()
    if isinstance(request, dict):
        return {k: _take_loaded(v, loaded.get(k) if isinstance(loaded, dict) else None)
                for k, v in request.items()}
    if isinstance(request, list):
        return [_take_loaded(v, loaded[i] if isinstance(loaded, list) and i < len(loaded)
                             else None) for i, v in enumerate(request)]
    return request


def _saved_step(loaded) -> Optional[float]:
    """The step in a sub-optimizer's loaded state, in either layout (None: never stepped)."""
    if "param_state_sharding_type" in loaded:  # written by the distributed optimizer
        steps = {g.get("step") for g in loaded["optimizer"]["param_groups"]} - {None}
        if len(steps) > 1:
            raise ValueError(f"the checkpoint's parameter groups disagree on the step: {steps}")
        return float(steps.pop()) if steps else None
    step = loaded.get("state", {}).get("common_step")
    return None if step is None else float(step)


def _main_params_from_model(sub, param_state) -> None:
    """The fp32 model tensors as the main parameters the checkpoint does not hold, in the order
    of Megatron's ``sharded_param_state_fully_reshardable`` (buffer by buffer)."""
    model_params = [p for buffer in sub.buffers for p in buffer.param_index_map]
    for index, tensors in param_state.items():
        if tensors.get("param") is None:
            if model_params[index].dtype != torch.float32:
                raise ValueError("the checkpoint holds no fp32 main parameters for a "
                                 f"{model_params[index].dtype} model")
            tensors["param"] = model_params[index].detach()


def _convert(sub, request, loaded):
    saved_by_distributed = "param_state_sharding_type" in loaded
    if saved_by_distributed == _is_distributed(sub):
        return loaded
    state = _take_loaded(request, loaded)
    step = _saved_step(loaded)
    if _is_distributed(sub):
        _main_params_from_model(sub, state["param_state"])
        for group in state["optimizer"]["param_groups"]:
            group["step"] = step or 0.0  # torch's Adam at step 0 starts as a fresh one
    elif step is not None:  # a step of 0 too: torch's Adam fails on moments without a step
        state["state"]["common_step"] = torch.tensor(step, dtype=torch.float32)
    return state


def as_loading_format(optimizer, request, loaded):
    """The loaded optimizer state in the layout ``optimizer.load_state_dict`` expects.

    ``request`` is the sharded state dict the load was asked for (the loading optimizer's own
    layout), ``loaded`` what ``dist_checkpointing.load`` returned for it: the checkpoint's
    non-tensor part with the requested tensors merged in. Unchanged when the checkpoint was
    written by the same optimizer kind. Call it once the model is loaded: an fp32 checkpoint of
    the plain optimizer gives the distributed one its main parameters from the model."""
    subs = sub_optimizers(optimizer)
    if len(subs) == 1:
        return _convert(subs[0], request, loaded)
    return {i: _convert(sub, request[i], loaded[i]) for i, sub in enumerate(subs)}


# --- reading Adam's state out by name -------------------------------------------------------

def _model_to_main(sub) -> Dict[torch.Tensor, Tuple[torch.Tensor, Optional[Any]]]:
    """model parameter -> (the parameter Adam's state is keyed by, this rank's range of the
    flattened model parameter or None for all of it)."""
    if _is_distributed(sub):
        found = {}
        for model_param, (group, order) in sub.model_param_group_index_map.items():
            main = sub.optimizer.param_groups[group]["params"][order]
            found[model_param] = (main, sub._get_model_param_range_map(model_param)["param"])
        return found
    if hasattr(sub, "float16_groups"):  # mixed precision: fp32 copies of the bf16 parameters
        pairs = [(m, f) for ms, fs in zip(sub.float16_groups, sub.fp32_from_float16_groups)
                 for m, f in zip(ms, fs)]
        pairs += [(p, p) for group in sub.fp32_from_fp32_groups for p in group]
        return {m: (f, None) for m, f in pairs}
    return {p: (p, None) for group in sub.optimizer.param_groups for p in group["params"]}


def _state_like(model_param, state, span) -> Dict[str, torch.Tensor]:
    """This rank's moments as tensors of the model parameter's shape (NaN outside ``span``)."""
    out = {}
    for name in MOMENTS:
        flat = torch.full((model_param.numel(),), math.nan, dtype=torch.float32)
        value = state[name].detach().float().reshape(-1).cpu()
        if span is None:
            flat.copy_(value)
        else:
            flat[span.start:span.end] = value
        out[name] = flat.view(model_param.shape)
    return out


def adam_state_pieces(model_chunks, optimizer) -> List[Dict[str, Any]]:
    """This rank's Adam state, one piece per (global tensor, state) region it holds: ``key``,
    ``global_shape``, ``global_offset``, ``local_shape``, ``exp_avg``, ``exp_avg_sq`` (NaN where
    another data-parallel rank of a distributed optimizer holds the elements) and ``step``.
    :func:`merge_adam_state` over every rank's pieces gives whole tensors."""
    mains = {}
    for sub in sub_optimizers(optimizer):
        mains.update(_model_to_main(sub))
    states = {}
    for sub in sub_optimizers(optimizer):
        states.update(sub.optimizer.state)
    pieces = []
    for chunk in model_chunks:
        for item in _sharded_items(model_sharded_state_dict(chunk.module)):
            if item.data not in mains or not states.get(mains[item.data][0]):
                continue  # not trained (frozen), or no step taken yet
            main, span = mains[item.data]
            state = states[main]
            moments = _state_like(item.data, state, span)
            step = float(state["step"]) if "step" in state else None
            built = {name: _built(item, tensor) for name, tensor in moments.items()}
            for parts in zip(*built.values()):
                first = parts[0]
                # stacked layers: the layer axes lead the global shape, not the local one
                local = (1,) * first.prepend_axis_num + tuple(first.local_shape)
                pieces.append({"key": first.key, "global_shape": tuple(first.global_shape),
                               "global_offset": tuple(first.global_offset),
                               "local_shape": local, "step": step,
                               **{n: p.data.reshape(local).clone()
                                  for n, p in zip(built, parts)}})
    return pieces


def _built(item, data) -> List:
    """The ShardedTensors of ``item`` (a model tensor's, or a factory's) over ``data``."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    copy = dataclasses.replace(item, data=data)
    if isinstance(copy, ShardedTensorFactory):
        return [t for t in nested_values(copy.build()) if isinstance(t, ShardedTensor)]
    return [copy]


def merge_adam_state(pieces: Iterable[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """Whole tensors by key: ``{key: {"exp_avg", "exp_avg_sq", "step"}}`` from the pieces of every
    rank. Raises if two ranks disagree on an element or a step, or if an element is held by no
    rank."""
    merged: Dict[str, Dict[str, Any]] = {}
    for piece in pieces:
        entry = merged.setdefault(piece["key"], {
            **{n: torch.full(piece["global_shape"], math.nan) for n in MOMENTS}, "steps": set()})
        region = tuple(slice(o, o + n) for o, n in zip(piece["global_offset"],
                                                       piece["local_shape"]))
        for name in MOMENTS:
            old, new = entry[name][region], piece[name]
            both = ~old.isnan() & ~new.isnan()
            if not torch.equal(old[both], new[both]):
                raise ValueError(f"{piece['key']}: ranks disagree on {name} at {region}")
            entry[name][region] = torch.where(new.isnan(), old, new)
        entry["steps"].add(piece["step"])
    for key, entry in merged.items():
        holes = [n for n in MOMENTS if entry[n].isnan().any()]
        if holes or len(entry["steps"]) != 1:
            raise ValueError(f"{key}: elements of {holes} held by no rank, or steps "
                             f"{sorted(map(str, entry['steps']))} differ")
        entry["step"] = entry.pop("steps").pop()
    return merged
