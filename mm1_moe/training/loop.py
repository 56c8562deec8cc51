"""The training loop on Megatron-core's forward-backward schedules.

One optimizer step = ``num_microbatches`` forward/backward passes through Megatron's schedule
for the layout (no pipelining, 1F1B, or interleaved 1F1B), DP gradient reduction in
``finalize_model_grads``, one optimizer and LR-scheduler step. So far the data is the generated
text stream; images, the MM1 mixture, checkpoints and metrics files extend this loop.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..config import Config, ConfigError, dump_config
from ..models.builder import build_model_chunks, wrap_ddp
from ..moe.balance import update_expert_biases
from ..moe.layer import MoELayer, MoEMetrics
from ..runtime import Runtime, initialize, shutdown
from ..runtime.threads import CpuShare
from .data import build_data
from .checkpoint import (COMPLETE, complete_checkpoints, load_checkpoint, resume_latest,
                         save_checkpoint)
from .metrics import MetricsLog, device_peak_tflops, step_record
from .optimizer import build_optimizer


@dataclass
class StepLog:
    """One optimizer step: ``lr`` is the learning rate that step trained with; ``moe`` maps each
    MoE layer (global, 1-based, as Megatron numbers them) to its routing statistics over the
    step's tokens (filled on logging steps)."""

    step: int
    loss: float
    grad_norm: float
    lr: float
    tokens_per_s: float
    tflops_per_gpu: float = 0.0
    mfu: Optional[float] = None
    moe: Dict[int, Dict[str, float]] = field(default_factory=dict)
    empty_microbatches: int = 0  # micro-batches with no loss token (all their documents lost)


@dataclass
class TrainResult:
    steps: List[StepLog] = field(default_factory=list)
    sample: Optional[Dict[str, str]] = None  # a caption the model wrote, when on_finish adds one

    @property
    def losses(self) -> List[float]:
        return [s.loss for s in self.steps]


def masked_lm_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Mean LM loss over the tokens the mask keeps; Megatron's schedule divides it by the number
    of micro-batches, and every layout forms the same micro-batches (the loader deals them
    whole), so every layout trains on the same mean of micro-batch means.

    A micro-batch with no token to take a loss on (its documents were dropped for images that do
    not decode) contributes zero loss and zero gradient; the trainer counts and reports it, and
    the loader's limit on lost sequences is what stops a run."""
    mask = loss_mask.reshape(-1).float()
    total = mask.sum()
    loss = (per_token_loss.reshape(-1).float() * mask).sum() / total.clamp(min=1.0)
    # clone: the schedule rescales the reported loss in place
    return loss, {"lm_loss": loss.detach().clone(), "loss_tokens": total.detach()}


def forward_step(device: torch.device, data_iterator, model):
    """Megatron ``forward_step_func``: one micro-batch through this stage's chunk."""
    batch = {k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()}
    # The MoE layers' padding_mask [B, S]: routing statistics and auxiliary losses count real
    # text tokens (not image placeholders, not padding).
    routing = batch["routing_mask"] if "routing_mask" in batch else batch["loss_mask"] > 0
    extra = {k: batch[k] for k in ("images", "images_per_sequence") if k in batch}
    if "cu_seqlens" in batch:
        extra["packed_seq_params"] = packed_documents(batch["cu_seqlens"],
                                                      batch["tokens"].shape[1])
    output = model(batch["tokens"], batch["position_ids"], attention_mask=None,
                   labels=batch["labels"], padding_mask=routing, **extra)
    return output, partial(masked_lm_loss, batch["loss_mask"])


def packed_documents(cu_seqlens: torch.Tensor, total: int):
    """Document boundaries of the (1 x ``total``) packed micro-batch for the core attention."""
    from megatron.core.packed_seq_params import PackedSeqParams

    # max_seqlen is the whole row, not the longest document: with the sbhd layout Megatron sizes
    # the rotary table by it (one position per token; RoPE is relative, so positions running on
    # across documents change nothing inside the document mask). An upper bound for flash-attn.
    # ``total`` comes from the batch's shape: reading cu_seqlens[-1] would sync with the GPU.
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=total, max_seqlen_kv=total)


def training_flops_per_token(config: Config) -> float:
    """Model FLOPs per trained token (decoder: 3 x forward), from ``mm1_moe.info``."""
    from ..info import flops_per_token

    return float(flops_per_token(config)["training"])


def decoder_param_count(config: Config) -> int:
    """Parameters of the language model (what MM1's LR law is fitted on): the formula of
    ``mm1_moe.info``, which the tests check against the built module tree."""
    from ..info import param_counts

    counts = param_counts(config)
    return counts.decoder_dense + counts.experts + counts.routers


def _global_loss(losses: List[Dict[str, torch.Tensor]]) -> Tuple[float, int]:
    """(mean of the micro-batch losses over the last stage's data-parallel ranks, number of
    micro-batches with no loss token), made known to every rank (one all-reduce over the
    world). The mean leaves out the empty micro-batches: they train on nothing, and a 0 in the
    average would report a loss the model does not have."""
    from megatron.core import parallel_state as ps

    reporting = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    values = torch.zeros(3, dtype=torch.float64)  # [sum of losses, micro-batches, empty ones]
    if reporting:
        for entry in losses:
            if float(entry["loss_tokens"]) > 0:
                values[0] += float(entry["lm_loss"])
                values[1] += 1.0
            else:
                values[2] += 1.0
    if dist.get_world_size() > 1:
        dist.all_reduce(values)
    loss = float(values[0] / values[1]) if values[1] > 0 else math.nan
    return loss, int(values[2])


def reduce_over_data_parallel(metrics: MoEMetrics) -> MoEMetrics:
    """One layer's statistics over the whole step: the data-parallel ranks (expert-parallel
    ones included: Megatron carves them out of the data-parallel group) saw different tokens,
    so expert loads and dropped slots are summed and the per-micro-batch aux and z losses
    averaged (every rank runs the same number of micro-batches). Tensor-parallel ranks saw the
    same tokens and are left out. Collective over the data-parallel group."""
    from megatron.core import parallel_state as ps

    size = ps.get_data_parallel_world_size()
    if size == 1:
        return metrics
    counts = metrics.tokens_per_expert_E.to(torch.float64)
    packed = torch.cat([counts, torch.tensor([metrics.dropped, metrics.aux_loss,
                                              metrics.z_loss], dtype=torch.float64)])
    dist.all_reduce(packed, group=ps.get_data_parallel_group())
    E = counts.numel()
    return MoEMetrics(packed[:E].round().to(torch.int64), int(round(float(packed[E]))),
                      float(packed[E + 1]) / size, float(packed[E + 2]) / size,
                      metrics.expert_bias_E)  # the same on every data-parallel rank


def gather_moe_metrics(layers: List[MoELayer]) -> Dict[int, Dict[str, float]]:
    """Each MoE layer's statistics over the step, reduced over the data-parallel ranks
    (``reduce_over_data_parallel``) and collected from every pipeline stage, so every layout
    reports what one process reports. Collective: every rank calls it."""
    local: Dict[int, Dict[str, float]] = {}
    for layer in layers:
        metrics = layer.metrics.read(layer.router.expert_bias)
        if metrics is None:
            continue
        local[int(layer.layer_number)] = reduce_over_data_parallel(metrics).summary()
    if dist.get_world_size() == 1:
        return local
    gathered: List[Dict[int, Dict[str, float]]] = [None] * dist.get_world_size()  # type: ignore
    dist.all_gather_object(gathered, local)
    merged: Dict[int, Dict[str, float]] = {}
    for part in gathered:
        for number, stats in part.items():
            merged.setdefault(number, stats)
    return dict(sorted(merged.items()))


def _configure_schedule(chunks, optimizer) -> None:
    """The hooks Megatron's schedules call: DP grad reduction after the last micro-batch, no
    sync during accumulation, loss scaling (1.0 outside fp16)."""
    from megatron.core.distributed import finalize_model_grads

    for chunk in chunks:
        cfg = chunk.config
        cfg.finalize_model_grads_func = finalize_model_grads
        cfg.grad_scale_func = optimizer.scale_loss
        cfg.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync


class Trainer:
    """Builds the model, optimizer and data for ``config`` on a started runtime and runs steps."""

    def __init__(self, config: Config, runtime: Runtime,
                 log: Optional[Callable[[StepLog], None]] = None):
        from megatron.core import parallel_state as ps

        self.config, self.runtime, self.log = config, runtime, log
        chunks = build_model_chunks(config, on_cpu=runtime.cpu_compat)
        self.num_params = decoder_param_count(config)
        self.model = wrap_ddp(config, chunks, config.train.distributed_optimizer)
        self.optimizer, self.scheduler = build_optimizer(config, self.model, self.num_params)
        _configure_schedule(self.model, self.optimizer)
        self.data = build_data(config, ps.get_data_parallel_rank(), runtime.data_parallel_size)
        self.step_index = 0
        self.empty_microbatches = 0
        self.metrics_log = MetricsLog(config.train.output_dir) if runtime.is_main else None
        self.flops_per_token = training_flops_per_token(config)
        self.peak_tflops = device_peak_tflops(config.train.peak_tflops)
        self.moe_layers = [m for chunk in self.model for m in chunk.modules()
                           if isinstance(m, MoELayer)]

    def train_step(self) -> StepLog:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        start = time.perf_counter()
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        micro = list(self.data.next_step())
        for layer in self.moe_layers:  # aux-loss gradients scaled as the LM loss is
            layer.aux_loss_scale = 1.0 / len(micro)
            layer.balance.start_step()
        iterators = [iter(micro) for _ in self.model]
        losses = get_forward_backward_func()(
            forward_step_func=partial(forward_step, self.runtime.device),
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.model if len(self.model) > 1 else self.model[0],
            num_microbatches=len(micro),
            # packed MM1 micro-batches arrive as one row of B*S tokens (see training/data.py)
            seq_length=micro[0]["tokens"].shape[1],
            micro_batch_size=micro[0]["tokens"].shape[0],
            forward_only=False,
        )
        # Advance the schedule first, so step s trains at lr(s): step 1 at peak/warmup (not 0,
        # as Megatron-LM's order gives), the last step at the cosine's floor.
        self.scheduler.step(increment=1)
        lr = self.optimizer.param_groups[0]["lr"]
        _, grad_norm, _ = self.optimizer.step()
        # balance: bias|both: the step's expert loads move the routing biases (one all-reduce)
        update_expert_biases(self.moe_layers, self.config.model.decoder.moe.bias_update_rate)
        self.step_index += 1
        elapsed = time.perf_counter() - start
        tokens = self.config.train.global_batch_size * self.config.data.seq_length
        tflops = self.flops_per_token * tokens / elapsed / 1e12 / self.runtime.world_size
        loss, empty = _global_loss(losses)
        entry = StepLog(self.step_index, loss,
                        float(grad_norm) if grad_norm is not None else math.nan,
                        lr, tokens / elapsed, tflops,
                        tflops / self.peak_tflops if self.peak_tflops else None,
                        empty_microbatches=empty)
        if empty:
            self.empty_microbatches += empty
            if self.runtime.is_main:
                print(f"warning: step {self.step_index}: {empty} micro-batch(es) had no token "
                      "to take a loss on (every document lost to images that do not decode); "
                      f"they count as zero loss ({self.empty_microbatches} in this run so far)",
                      flush=True)
        log_step = self.step_index % self.config.train.log_interval == 0
        if log_step or self.step_index == self.config.train.steps:
            entry.moe = gather_moe_metrics(self.moe_layers)
        else:
            for layer in self.moe_layers:
                layer.metrics.reset()
        if self.metrics_log is not None:
            self.metrics_log.write(step_record(entry))
        if self.log is not None:
            self.log(entry)
        return entry

    # --- checkpoints ----------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> str:
        return os.path.join(self.config.train.output_dir, "checkpoints")

    def save(self) -> str:
        from ..config import dump_config as _dump

        path = save_checkpoint(self.checkpoint_root, self.step_index, self.model, self.optimizer,
                               self.scheduler, self.data.state_dict(), _dump(self.config))
        if self.runtime.is_main:
            print(f"checkpoint saved: {path}", flush=True)
        return path

    def load(self, path: str) -> Dict[str, object]:
        state = load_checkpoint(path, self.model, self.optimizer, self.scheduler)
        self.step_index = state["step"]
        self.data.load_state_dict(state["data_state"])
        return state

    def restore(self) -> Optional[str]:
        """Resume from this run's newest loadable checkpoint; else start from
        ``train.load_from`` (a step folder or a checkpoints root), if set."""
        report = print if self.runtime.is_main else (lambda _msg: None)
        tr = self.config.train
        state = resume_latest(self.checkpoint_root, self.load, report) if tr.resume else None
        if state is None and tr.load_from:
            if not os.path.isdir(tr.load_from):
                raise ConfigError(f"train.load_from ({tr.load_from!r}) does not exist")
            root = tr.load_from
            if not complete_checkpoints(root) and os.path.isdir(os.path.join(root, "checkpoints")):
                root = os.path.join(root, "checkpoints")  # a run folder
            if os.path.isfile(os.path.join(root, COMPLETE)):
                state = dict(self.load(root), path=root)
            else:
                state = resume_latest(root, self.load, report)
            if state is None:
                raise ConfigError(f"train.load_from ({tr.load_from!r}) holds no complete "
                                  "checkpoint (step_* folder with complete.json)")
        if self.metrics_log is not None:  # one record per step in metrics.jsonl
            self.metrics_log.resume_at(self.step_index)
        if state is None:
            return None
        report(f"resumed from {state['path']} at step {state['step']}")
        return state["path"]


def train(config: Config, log: Optional[Callable[[StepLog], None]] = None,
          on_finish: Optional[Callable[["Trainer"], None]] = None) -> TrainResult:
    """Start the runtime, resume if a checkpoint exists, train up to ``config.train.steps``,
    save as configured, tear down. Returns the logs of the steps this call ran (identical on
    every rank)."""
    runtime = initialize(config)
    try:
        if runtime.is_main:  # after start-up: a layout that cannot start leaves no files
            dump_config(config, os.path.join(config.train.output_dir, "config.yaml"))
        # CPU: intra-op threads follow the cores other processes leave free (runtime/threads.py);
        # the first look covers the model build
        share = CpuShare(report=print if runtime.is_main else None) if runtime.cpu_compat \
            else None
        trainer = Trainer(config, runtime, log if runtime.is_main else None)
        trainer.restore()
        result = TrainResult()
        interval = config.train.save_interval
        while trainer.step_index < config.train.steps:
            if share is not None:
                share.update()
            result.steps.append(trainer.train_step())
            if interval and trainer.step_index % interval == 0:
                trainer.save()
        if config.train.save_final and (not interval or trainer.step_index % interval):
            trainer.save()
        if on_finish is not None:  # collective: every rank runs it (e.g. a sample caption)
            on_finish(trainer)
        return result
    finally:
        shutdown()
