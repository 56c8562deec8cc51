"""Checkpoints that survive failures, on Megatron's ``dist_checkpointing``.

Layout: ``<root>/step_00000100/`` holds a distributed checkpoint (model chunks and optimizer
as sharded tensors, so it reshards: a TP2/PP2/EP2 checkpoint loads into TP1/PP1/EP1 and back,
and Adam's state moves between the distributed optimizer and the plain one either way:
``optimizer_state.py``) plus ``complete.json``. A checkpoint is written to
``step_00000100.tmp`` and renamed only once every rank has finished and rank 0 has written
``complete.json``: a crash mid-save leaves a ``.tmp`` folder that resume ignores, never a
checkpoint that loads half.

Saved: model and optimizer (``dist_checkpointing``: tensors, plus Megatron's ``common.pt``);
step, LR scheduler and data position (``data_state``) in ``complete.json``; each rank's RNG
states in ``rng/pp*_tp*_dp*.json`` (``rng_state.py``; restored only when the layout is
unchanged: RNG streams are per rank). Nothing of ours is pickled, and what Megatron and torch
unpickle on load goes through ``safe_load.restricted_unpickling``: a checkpoint runs no code.
Resume takes the newest complete checkpoint; one that fails to load is reported with its path
and the reason, and the previous one is used.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import yaml

from ..models.init import model_sharded_state_dict
from ..runtime.threads import serial_collectives
from . import rng_state
from .optimizer_state import as_loading_format, redirect_missing_tensors, sub_optimizers
from .safe_load import CheckpointError, failure_cause, restricted_unpickling

__all__ = ["CheckpointError", "COMPLETE", "complete_checkpoints", "load_checkpoint",
           "read_meta", "resume_latest", "save_checkpoint", "step_path"]

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
    """``complete.json`` of the checkpoint ``path`` (JSON only: step, layout, config, and since
    the pickle-free format, scheduler and data_state)."""
    file = os.path.join(path, COMPLETE)
    try:
        with open(file, encoding="utf-8") as handle:
            meta = json.load(handle)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{file} is not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file} does not hold a JSON object")
    return meta


def _layout() -> Dict[str, int]:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(),
            "ep": ps.get_expert_model_parallel_world_size(),
            "dp": ps.get_data_parallel_world_size(), "world": dist.get_world_size()}


def _sharded_state(model_chunks, optimizer, loading: bool) -> Dict[str, Any]:
    state: Dict[str, Any] = {f"model{i}": model_sharded_state_dict(chunk.module)
                             for i, chunk in enumerate(model_chunks)}
    # fully_reshardable: the distributed optimizer's state is saved in model space (gathered
    # per parameter), so it reloads under any TP/PP/EP/DP layout and into the plain optimizer
    # (the same tensor names); 0.16.1's default format relies on flattened ranges that its own
    # dist_checkpointing no longer accepts. Loading it back with torch's Adam needs the
    # registry's distopt_adam_step.
    # On CPU the gather must go through gloo (the "mem_efficient" variant; its default path
    # moves each buffer to CUDA with Tensor.cuda()).
    metadata = {"distrib_optim_sharding_type": "fully_reshardable",
                "distrib_optim_fully_reshardable_mem_efficient": not torch.cuda.is_available()}
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=loading,
                                                      metadata=metadata)
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
    rng = rng_state.capture()
    state = _sharded_state(model_chunks, optimizer, loading=False)
    with serial_collectives():  # see runtime/threads.py: 2x slower steps after a save otherwise
        dist_checkpointing.save(state, tmp)
    # after the save: Megatron warns "Overwriting old incomplete / corrupted checkpoint" when
    # the folder it saves into is not empty
    rng_state.write(tmp, rng)
    _barrier()
    if dist.get_rank() == 0:
        meta = {"step": step, "layout": _layout(), "saved_at": time.time(),
                "config": config_yaml, "scheduler": scheduler.state_dict(),
                "data_state": data_state}
        with open(os.path.join(tmp, COMPLETE), "w", encoding="utf-8") as handle:
            json.dump(meta, handle, indent=1)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    _barrier()
    return final


def _agree(error: Optional[str]) -> None:
    """Raise on every rank if any rank failed a local check: a rank that went on alone would
    wait forever in the load's first collective."""
    errors = [error]
    if dist.is_initialized() and dist.get_world_size() > 1:
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
    failed = [(rank, e) for rank, e in enumerate(errors) if e]
    if failed:
        raise CheckpointError(error or f"rank {failed[0][0]}: {failed[0][1]}")


def _train_state(meta: Dict[str, Any], loaded: Dict[str, Any], path: str) -> Dict[str, Any]:
    """step, scheduler and data_state: from complete.json, or for a checkpoint written before
    they moved there, from Megatron's common.pt (which the restricted unpickler read)."""
    source, name = (meta, COMPLETE) if "scheduler" in meta else (loaded, "common.pt")
    missing = [k for k in ("step", "scheduler", "data_state") if k not in source]
    if missing:
        raise CheckpointError(f"{path}: no {', '.join(missing)} in {name}")
    return source


def _read_rng(path: str, meta: Dict[str, Any]) -> Optional[rng_state.RngStates]:
    """This rank's RNG states (None for a checkpoint from before they were saved as JSON),
    read and checked on every rank before anything is loaded."""
    rng, error = None, None
    if "scheduler" in meta:
        try:
            rng = rng_state.read(path)
        except CheckpointError as err:
            error = str(err)
    else:
        warnings.warn(f"{path} predates RNG states saved as JSON: they are not restored, so "
                      "the resumed run will not repeat an uninterrupted one bit for bit")
    _agree(error)
    return rng


def _saved_dtype(meta: Dict[str, Any]) -> Optional[str]:
    """train.dtype of the run that saved (None for a checkpoint without its config)."""
    try:
        return yaml.safe_load(meta.get("config") or "")["train"]["dtype"]
    except (yaml.YAMLError, KeyError, TypeError):
        return None


def _run_dtype(optimizer) -> str:
    return "bf16" if any(getattr(getattr(o, "config", None), "bf16", False)
                         for o in sub_optimizers(optimizer)) else "fp32"


def _check_dtype(meta: Dict[str, Any], optimizer, path: str) -> None:
    """The optimizer state of a bf16 run (fp32 main params beside bf16 weights) and of an fp32
    run differ in kind; Megatron fails deep in the load (KeyError 'pre_wd_mult', a missing
    fp32_param key). Say so before anything is read."""
    saved, current = _saved_dtype(meta), _run_dtype(optimizer)
    if saved is not None and saved != current:
        raise CheckpointError(
            f"{path} was saved by a train.dtype={saved} run and this run has "
            f"train.dtype={current}: optimizer state does not convert between the two. Resume "
            f"with train.dtype={saved}.")


def load_checkpoint(path: str, model_chunks, optimizer, scheduler) -> Dict[str, Any]:
    """Load ``path`` into the chunks, optimizer and scheduler (resharding as needed); restore RNG
    when the layout matches. Returns {"step", "data_state"}. Raises CheckpointError on a bad
    checkpoint (a refused pickle, a corrupt file, missing state), naming the file and reason."""
    from megatron.core import dist_checkpointing

    meta = read_meta(path)
    _check_dtype(meta, optimizer, path)
    same_layout = meta.get("layout") == _layout()
    rng = _read_rng(path, meta) if same_layout else None  # set only once all else loaded
    sharded = _sharded_state(model_chunks, optimizer, loading=True)
    with serial_collectives(), restricted_unpickling(path):
        saved_tensors = dist_checkpointing.load_tensors_metadata(path)
        # a checkpoint of the other optimizer kind names the main parameters differently
        redirect_missing_tensors(sharded["optimizer"], saved_tensors)
        kept_biases = _reconcile_expert_biases(sharded, saved_tensors, path)
        loaded = dist_checkpointing.load(sharded, path)
    state = _train_state(meta, loaded, path)
    for i, chunk in enumerate(model_chunks):
        loaded[f"model{i}"].update(kept_biases.get(f"model{i}", {}))
        chunk.module.load_state_dict(loaded[f"model{i}"], strict=True)
    optimizer.load_state_dict(as_loading_format(optimizer, sharded["optimizer"],
                                                loaded["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    if rng is not None:
        rng_state.restore(rng)
    return {"step": int(state["step"]), "data_state": state["data_state"]}


def _reconcile_expert_biases(sharded: Dict[str, Any], saved_tensors: Dict[str, Any],
                             path: str) -> Dict[str, Dict[str, torch.Tensor]]:
    """The routers' expert biases (``balance: bias|both``) between runs that balance
    differently. A checkpoint without them (an aux-loss run) starts this run's biases at zero:
    they are taken out of what is loaded and kept as they are (returned, per model chunk). A
    checkpoint with biases that this run does not use is loaded without them, loudly: its
    routing chose experts with them."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    suffix = "router.expert_bias"
    kept: Dict[str, Dict[str, torch.Tensor]] = {}
    wanted = 0
    for name, part in sharded.items():
        if not name.startswith("model"):
            continue
        for key in [k for k, v in part.items() if k.endswith(suffix)
                    and isinstance(v, ShardedTensor)]:
            wanted += 1
            if part[key].key not in saved_tensors:
                kept.setdefault(name, {})[key] = part.pop(key).data
    if kept and dist.get_rank() == 0:
        print(f"{path} holds no expert biases (it was saved by a run without "
              "model.decoder.moe.balance: bias|both): they start at zero", flush=True)
    if not wanted and any(k.endswith(suffix) for k in saved_tensors):
        warnings.warn(f"{path} holds expert biases (saved with model.decoder.moe.balance: bias "
                      "or both) that this run does not use (balance: aux_loss): its routing "
                      "chose experts with them, this run's will not, and its checkpoints will not "
                      "hold them. Set balance: bias or both to keep them.")
    return kept


def resume_latest(root: str, load: Callable[[str], Dict[str, Any]],
                  report: Callable[[str], None] = print) -> Optional[Dict[str, Any]]:
    """Load the newest complete checkpoint under ``root`` that loads; report each one that does
    not (with its path and the reason) and fall back to the previous one. Raises CheckpointError
    listing every path and reason when none loads."""
    from torch.distributed.checkpoint.api import CheckpointException

    failures: List[str] = []
    for path in complete_checkpoints(root):
        try:
            result = load(path)
        # A corrupt checkpoint: say which and why, use the one before. torch's
        # CheckpointException derives from BaseException, and it is raised on every rank alike
        # (DCP gathers the failures), so all ranks fall back together.
        except (Exception, CheckpointException) as err:
            cause = failure_cause(err)
            cause = cause[len(path) + 2:] if cause.startswith(f"{path}: ") else cause
            failures.append(f"{path}: {cause}")
            report(f"checkpoint {path} could not be loaded ({cause}); trying the previous one")
            continue
        result["path"] = path
        return result
    if failures:
        raise CheckpointError(
            f"no checkpoint under {root} could be loaded ({len(failures)} tried):\n  "
            + "\n  ".join(failures) + "\nRefusing to train from a partially loaded model. Move "
            "the broken checkpoints out of the folder, or set train.resume=false (or another "
            "train.output_dir) to start afresh.")
    return None
