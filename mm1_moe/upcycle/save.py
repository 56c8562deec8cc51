"""Writing the upcycled model as a step-0 training checkpoint (``training.checkpoint`` format).

The checkpoint must load through ``Trainer.load`` - model, optimizer, scheduler, data position -
so ``mm1-moe train`` resumes from it (``train.output_dir=<out>``) or starts from it
(``train.load_from=<out>/checkpoints``) under any layout: it is a ``dist_checkpointing``
checkpoint, so a TP1/EP1 save reshards into TP/EP/PP on load.

Optimizer state. Megatron writes Adam's moments only once they exist, and a fresh optimizer has
none, so a fresh one's checkpoint fails to load (its moments are requested but absent). The
moments are therefore created as zeros (Megatron's own ``init_state_fn``), which is what Adam
starts from. Adam's step is the other catch: Megatron 0.16.1 saves the shared step only ``if
step:`` (``FP32Optimizer.sharded_state_dict``), so a step of 0 is dropped, and torch's Adam then
fails on a state without one (KeyError 'step'). It is stored as 1e-30 instead: truthy, and
1e-30 + 1 == 1 in fp32, so the first update uses step 1's bias correction, exactly as a fresh
Adam does (the test compares against a fresh optimizer bit for bit).
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional

import torch

from ..config import Config, dump_config
from ..models.builder import wrap_ddp
from ..training.checkpoint import save_checkpoint
from ..training.optimizer import build_optimizer
from ..training.optimizer_state import sub_optimizers

FRESH_STEP = 1e-30  # see the module docstring

MomentsFn = Callable[[str, torch.Tensor], Optional[Dict[str, torch.Tensor]]]


def fresh_optimizer_state_(optimizer) -> None:
    """Zero moments and a step that behaves as 0 (see the module docstring)."""
    for sub in sub_optimizers(optimizer):
        sub.init_state_fn(sub.optimizer, sub.config)
        for group in sub.optimizer.param_groups:
            for param in group["params"]:
                sub.optimizer.state[param]["step"] = torch.tensor(FRESH_STEP, dtype=torch.float32)


def write_checkpoint(out_dir: str, config: Config, chunks: List[torch.nn.Module],
                     saved_config: Config, set_state: Callable[[List, object], None]) -> str:
    """Wrap ``chunks`` (filled, single process) for training, build ``config``'s optimizer,
    let ``set_state(ddp_chunks, optimizer)`` fill its state, and save step 0 under
    ``<out_dir>/checkpoints``. ``saved_config`` is what ``complete.json`` records."""
    from ..training.data import build_data
    from ..training.loop import decoder_param_count

    for chunk in chunks:
        chunk.train()
    ddp_chunks = wrap_ddp(config, chunks)
    optimizer, scheduler = build_optimizer(config, ddp_chunks, decoder_param_count(config))
    set_state(ddp_chunks, optimizer)
    data_state = build_data(config, 0, 1).state_dict()  # a fresh pipeline's: start of the data
    return save_checkpoint(os.path.join(out_dir, "checkpoints"), 0, ddp_chunks, optimizer,
                           scheduler, data_state, dump_config(saved_config))
