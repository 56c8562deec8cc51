"""Checkpoints that survive failures, on Megatron's ``dist_checkpointing``.

Layout: ``<root>/step_00000100/`` holds a distributed checkpoint (model chunks and optimizer
as sharded tensors, so it reshards: a TP2/PP2/EP2 checkpoint loads into TP1/PP1/EP1 and back)
plus ``complete.json``. A checkpoint is written to ``step_00000100.tmp`` and renamed only once
every rank has finished and rank 0 has written ``complete.json``: a crash mid-save leaves a
``.tmp`` folder that resume ignores, never a checkpoint that loads half.

Saved: model, optimizer, LR scheduler, step, the data position (``data_state``), and each
rank's RNG states (restored only when the layout is unchanged: RNG streams are per rank).
Resume takes the newest complete checkpoint; one that fails to load is reported with its path
and the previous one is used.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from ..models.init import model_sharded_state_dict
from ..runtime.threads import serial_collectives

COMPLETE = "complete.json"
PREFIX = "step_"


def step_path(root: str, step: int) -> str:
    return os.path.join(root, f"{PREFIX}{step:08d}")


def complete_checkpoints(root: str) -> List[str]:
    """Complete checkpoints under ``root``, newest first (``.tmp`` folders are skipped)."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith(PREFIX) and not name.endswith(".tmp") and \
                os.path.isfile(os.path.join(path, COMPLETE)):
            found.append(path)
    return sorted(found, reverse=True)


def read_meta(path: str) -> Dict[str, Any]:
    with open(os.path.join(path, COMPLETE), encoding="utf-8") as handle:
        return json.load(handle)


def _layout() -> Dict[str, int]:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "ep": ps.get_expert_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(), "world": dist.get_world_size()}


def _rng_state() -> Dict[str, Any]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rng_sharded_object(state: Optional[Dict[str, Any]]):
    """Each rank's RNG states, addressed by (pp, tp, dp) rank, as Megatron-LM does."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    lay = _layout()
    return ShardedObject(
        "rng_state", state, (lay["pp"], lay["tp"], lay["dp"]),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
         ps.get_data_parallel_rank()), replica_id=0)


def _sharded_state(model_chunks, optimizer, loading: bool, rng: bool) -> Dict[str, Any]:
    state: Dict[str, Any] = {f"model{i}": model_sharded_state_dict(chunk.module)
                             for i, chunk in enumerate(model_chunks)}
    # fully_reshardable: the distributed optimizer's state is saved in model space (gathered
    # per parameter), so it reloads under any TP/PP/DP layout; 0.16.1's default format relies
    # on flattened ranges that its own dist_checkpointing no longer accepts.
    # On CPU the gather must go through gloo (the "mem_efficient" variant; its default path
    # moves each buffer to CUDA with Tensor.cuda()).
    metadata = {"distrib_optim_sharding_type": "fully_reshardable",
                "distrib_optim_fully_reshardable_mem_efficient": not torch.cuda.is_available()}
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=loading,
                                                      metadata=metadata)
    if rng:
        state["rng_state"] = _rng_sharded_object(None if loading else _rng_state())
    return state


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_checkpoint(root: str, step: int, model_chunks, optimizer, scheduler,
                    data_state: Dict[str, Any], config_yaml: str) -> str:
    """Write ``<root>/step_<step>`` atomically (collective: every rank calls it)."""
    from megatron.core import dist_checkpointing

    final, tmp = step_path(root, step), step_path(root, step) + ".tmp"
    if dist.get_rank() == 0:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)  # a crashed earlier attempt at this step
        os.makedirs(tmp)
    _barrier()
    state = _sharded_state(model_chunks, optimizer, loading=False, rng=True)
    state["scheduler"] = scheduler.state_dict()
    state["step"] = step
    state["data_state"] = data_state
    with serial_collectives():  # see runtime/threads.py: 2x slower steps after a save otherwise
        dist_checkpointing.save(state, tmp)
    _barrier()
    if dist.get_rank() == 0:
        meta = {"step": step, "layout": _layout(), "saved_at": time.time(),
                "config": config_yaml}
        with open(os.path.join(tmp, COMPLETE), "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=1)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    _barrier()
    return final


def _refuse_distributed_optimizer(optimizer, path: str) -> None:
    """megatron-core 0.16.1 cannot load a DistributedOptimizer checkpoint back without Apex or
    Transformer Engine: torch's Adam keeps a per-parameter ``step`` that its reshardable loader
    does not carry (KeyError 'step'), and a fresh optimizer has no ``step`` for its state_dict
    assertion. Saving works; loading is refused here, before anything is modified."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if any(isinstance(inner, DistributedOptimizer)
           for inner in getattr(optimizer, "chained_optimizers", [optimizer])):
        raise NotImplementedError(
            f"cannot load {path} with train.distributed_optimizer=true: megatron-core 0.16.1 "
            "reloads DistributedOptimizer state only with Apex or Transformer Engine. Resume "
            "with train.distributed_optimizer=false (the checkpoint reshards), or keep the "
            "run's optimizer off the distributed path.")


def load_checkpoint(path: str, model_chunks, optimizer, scheduler) -> Dict[str, Any]:
    """Load ``path`` into the chunks, optimizer and scheduler (resharding as needed); restore RNG
    when the layout matches. Returns {"step", "data_state"}. Raises on a bad checkpoint."""
    from megatron.core import dist_checkpointing

    meta = read_meta(path)
    same_layout = meta.get("layout") == _layout()
    _refuse_distributed_optimizer(optimizer, path)
    sharded = _sharded_state(model_chunks, optimizer, loading=True, rng=same_layout)
    with serial_collectives():
        loaded = dist_checkpointing.load(sharded, path)
    for i, chunk in enumerate(model_chunks):
        chunk.module.load_state_dict(loaded[f"model{i}"], strict=True)
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    return {"step": int(loaded["step"]), "data_state": loaded["data_state"]}


def resume_latest(root: str, load: Callable[[str], Dict[str, Any]],
                  report: Callable[[str], None] = print) -> Optional[Dict[str, Any]]:
    """Load the newest complete checkpoint under ``root`` that loads; report each one that does
    not (with its path and the error) and fall back to the previous one."""
    from torch.distributed.checkpoint.api import CheckpointException

    failures = 0
    for path in complete_checkpoints(root):
        try:
            result = load(path)
        # A corrupt checkpoint: say which, use the one before. torch's CheckpointException
        # derives from BaseException, and it is raised on every rank alike (DCP gathers the
        # failures), so all ranks fall back together.
        except (Exception, CheckpointException) as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
            failures += 1
            report(f"checkpoint {path} could not be loaded ({type(err).__name__}: "
                   f"{first_line[:300]}); trying the previous one")
            continue
        result["path"] = path
        return result
    if failures:
        raise RuntimeError(f"no checkpoint under {root} could be loaded ({failures} tried); "
                           "refusing to train from a partially loaded model. Move the broken "
                           "ones away, or set train.resume=false to start afresh.")
    return None
