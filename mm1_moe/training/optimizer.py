"""AdamW through Megatron's optimizer, with MM1's learning-rate law and schedule.

MM1's peak LR for a model of N parameters: eta = exp(-0.4214 ln N - 0.5535) (about 5.8e-5 at
3B, 4.1e-5 at 7B, 2.2e-5 at 30B), weight decay 0.1 x eta, linear warm-up, cosine decay to
``min_lr_ratio`` (10%) of the peak.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch

from ..config import Config


def mm1_peak_lr(num_params: float) -> float:
    """MM1's fitted optimal peak learning rate for a model of ``num_params`` parameters."""
    if num_params <= 0:
        raise ValueError(f"num_params ({num_params}) must be > 0")
    return math.exp(-0.4214 * math.log(num_params) - 0.5535)


def resolved_lr_and_wd(config: Config, num_params: float) -> Tuple[float, float]:
    """Peak LR (config, else MM1's law) and weight decay (config, else 0.1 x peak LR)."""
    lr = config.train.lr if config.train.lr is not None else mm1_peak_lr(num_params)
    wd = config.train.weight_decay if config.train.weight_decay is not None else 0.1 * lr
    return lr, wd


def build_optimizer(config: Config, ddp_chunks: List[torch.nn.Module], num_params: float):
    """Megatron's optimizer (AdamW, fp32 master weights when training in bf16) and its
    ``OptimizerParamScheduler`` (linear warm-up, cosine decay), both stepped once per step."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    tr = config.train
    lr, wd = resolved_lr_and_wd(config, num_params)
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=lr * tr.min_lr_ratio,
        weight_decay=wd,
        adam_beta1=tr.adam_beta1,
        adam_beta2=tr.adam_beta2,
        adam_eps=tr.adam_eps,
        clip_grad=tr.grad_clip,
        bf16=tr.dtype == "bf16",
        params_dtype=torch.bfloat16 if tr.dtype == "bf16" else torch.float32,
        use_distributed_optimizer=tr.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, ddp_chunks)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=lr,
        min_lr=lr * tr.min_lr_ratio,
        # Megatron asserts warm-up < decay steps; a run shorter than its warm-up still works.
        lr_warmup_steps=min(tr.warmup_steps, tr.steps - 1),
        lr_decay_steps=tr.steps,
        lr_decay_style="cosine",
        start_wd=wd,
        end_wd=wd,
        wd_incr_steps=tr.steps,
        wd_incr_style="constant",
        # On resume the config's schedule wins over the checkpoint's (only the step count is
        # restored), so raising train.steps extends the cosine instead of staying at its floor.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
    return optimizer, scheduler
