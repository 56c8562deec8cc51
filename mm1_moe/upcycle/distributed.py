"""Upcycling on the training ranks: ``torchrun --nproc-per-node N -m mm1_moe.cli upcycle ...``.

Each rank builds only its own part of the MoE model for the target layout (TP, PP, EP from the
MoE config) and the same rank's part of the dense model in the same TP/PP layout, filled by
``dist_checkpointing``'s sharded load (which reshards from whatever layout the dense checkpoint
was saved in; nothing is gathered to one process). Then, per parameter of this rank's MoE part:

- every tensor outside the MoE FFNs is a copy of the dense part's tensor of the same name (the
  layouts match, so the local shards do too);
- in an MoE layer, the router is built whole (it is replicated; seeded by its global name as
  in one process), and the local experts [ep_rank * e, (ep_rank + 1) * e) from the layer's dense
  FFN, gathered over the tensor-parallel group for that one layer (Megatron's fc1 shard r holds
  [gate_r; up_r]; fc2 shard r the columns r), through ``convert.expert_weights`` restricted to
  those experts: the values one process would put there, bit for bit.

Memory per rank: its dense shard (fp32, as the single-process path reads it), its MoE shard and
fresh optimizer state, plus one layer's whole dense FFN at a time. The function check runs both
models over the same sample batch with Megatron's schedule and compares the logits on the last
pipeline stage (each tensor-parallel rank its vocabulary slice), max over the ranks. Every rank
writes its part of the step-0 checkpoint (``save.write_checkpoint``); rank 0 the report.
"""

from __future__ import annotations

import copy
import re
import resource
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.distributed as dist

from ..config import Config
from ..models.builder import build_model_chunks
from ..moe.layer import MoELayer
from .convert import UpcycleError, UpcyclePlan, _router, expert_weights
from ..models.init import _sharded_tensors, layer_key
from .source import DenseSource, load_source_
from .verify import ATOL, Verification, fp32_rtol, sample_tokens

_LAYER = re.compile(r"^(.*?layers\.)(\d+)(\..*)$")


def layout_config(config: Config, dtype: str) -> Config:
    """``config`` in ``dtype``, drawing no throwaway initial weights (every tensor is filled)."""
    out = copy.deepcopy(config)
    out.train.dtype = dtype
    out.model.layout_invariant_init = False
    return out


def dense_layout_config(dense_cfg: Config, moe_config: Config) -> Config:
    """The dense model in the MoE run's TP/PP layout (no experts: EP does not apply), fp32."""
    out = layout_config(dense_cfg, "fp32")
    out.parallel = copy.deepcopy(moe_config.parallel)
    out.parallel.expert_parallel = 1
    return out


def _full_ffn(mlp: torch.nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """(fc1 [2F, D] = [gate; up], fc2 [D, F]) of a dense MLP, gathered over tensor parallelism."""
    from megatron.core import parallel_state as ps

    fc1, fc2 = mlp.linear_fc1.weight.detach().float(), mlp.linear_fc2.weight.detach().float()
    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return fc1, fc2
    group = ps.get_tensor_model_parallel_group()
    fc1_parts = [torch.empty_like(fc1) for _ in range(tp)]
    fc2_parts = [torch.empty_like(fc2) for _ in range(tp)]
    dist.all_gather(fc1_parts, fc1.contiguous(), group=group)
    dist.all_gather(fc2_parts, fc2.contiguous(), group=group)
    gate = torch.cat([part.chunk(2, dim=0)[0] for part in fc1_parts])
    up = torch.cat([part.chunk(2, dim=0)[1] for part in fc1_parts])
    return torch.cat([gate, up]), torch.cat(fc2_parts, dim=1)


def _layers(chunk: torch.nn.Module) -> Dict[str, int]:
    """Module path of each decoder layer -> its global index (Megatron's 1-based layer_number)."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    return {name: module.layer_number - 1 for name, module in chunk.named_modules()
            if isinstance(module, TransformerLayer) and ".decoder." in f".{name}"}


@torch.no_grad()
def fill_moe_from_dense_(moe_chunks: List[torch.nn.Module], dense_chunks: List[torch.nn.Module],
                         plan: UpcyclePlan) -> None:
    """Every parameter of this rank's MoE chunks from the same rank's dense chunks (module
    docstring); a tensor with no source, or a dense tensor left unused, raises."""
    for moe_chunk, dense_chunk in zip(moe_chunks, dense_chunks):
        dense_params = dict(dense_chunk.named_parameters())
        used: Set[str] = set()
        layers = _layers(moe_chunk)
        dense_modules = dict(dense_chunk.named_modules())
        for path, module in moe_chunk.named_modules():
            if not isinstance(module, MoELayer):
                continue
            layer_path = path.rsplit(".mlp", 1)[0]
            index = layers[layer_path]
            if index not in plan.moe_layers:
                raise UpcycleError(f"{path}: an MoE layer where the plan has none ({index})")
            fc1, fc2 = _full_ffn(dense_modules[f"{layer_path}.mlp"])
            used.update({f"{layer_path}.mlp.linear_fc1.weight", f"{layer_path}.mlp.linear_fc2.weight"})
            prefix = f"decoder.layers.{index}.mlp."  # the global names one process uses
            module.router.weight.copy_(_router(f"{prefix}router.weight", plan, fc1.shape[1]))
            e = module.experts.w1.shape[0]
            mine = range(module.experts.ep_rank * e, (module.experts.ep_rank + 1) * e)
            w1, w2 = expert_weights(fc1, fc2, plan, f"{prefix}experts", mine)
            module.experts.w1.copy_(w1)
            module.experts.w2.copy_(w2)
        for name, param in moe_chunk.named_parameters():
            if ".mlp.router." in name or ".mlp.experts." in name:
                continue
            source = dense_params.get(name)
            if source is None or source.shape != param.shape:
                got = None if source is None else tuple(source.shape)
                raise UpcycleError(f"MoE tensor {name} {tuple(param.shape)} has no dense "
                                   f"counterpart on this rank (found {got})")
            param.copy_(source)
            used.add(name)
        unused = sorted(set(dense_params) - used)
        if unused:
            raise UpcycleError(f"dense tensors with no place in the MoE model: {unused[:8]}")


def global_names(chunks: List[torch.nn.Module]) -> Set[str]:
    """The global tensor names every rank's chunks hold, together (collective)."""
    mine = {layer_key(sharded) for chunk in chunks for sharded in _sharded_tensors(chunk)}
    every: List[Set[str]] = [set() for _ in range(dist.get_world_size())]
    dist.all_gather_object(every, mine)
    return set().union(*every)


def _last_stage_logits(chunks: List[torch.nn.Module], tokens: torch.Tensor,
                       device: torch.device):
    """[B, S, V/tp] fp32 logits on the last pipeline stage (None elsewhere), eval mode."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    B, S = tokens.shape
    tokens, positions = tokens.to(device), torch.arange(S, device=device).expand(B, -1)

    def forward_step(_data, model):
        out = model(tokens, positions, attention_mask=None)
        return out, lambda output, non_loss_data=True: output.detach().float().cpu()

    for chunk in chunks:
        chunk.eval()
    try:
        with torch.no_grad():
            out = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=[iter([None])] * len(chunks)
                if len(chunks) > 1 else iter([None]),
                model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=1,
                seq_length=S, micro_batch_size=B, forward_only=True, collect_non_loss_data=True)
    finally:
        for chunk in chunks:
            chunk.train()
    return out[0] if out else None


def compare_distributed(dense_chunks: List[torch.nn.Module], moe_chunks: List[torch.nn.Module],
                        config: Config, device: torch.device, rtol: Optional[float] = None,
                        atol: float = ATOL) -> Verification:
    """Both models over the same sample batch; max |diff| and max |dense logit| over the real
    vocabulary of every rank's slice (all ranks get the result)."""
    from megatron.core import parallel_state as ps

    tokens = sample_tokens(config, config.train.seed)
    dense = _last_stage_logits(dense_chunks, tokens, device)
    moe = _last_stage_logits(moe_chunks, tokens, device)
    stats = torch.zeros(2, dtype=torch.float64)
    if dense is not None:
        width = dense.shape[-1]
        start = ps.get_tensor_model_parallel_rank() * width
        real = max(0, min(width, config.model.decoder.vocab_size - start))
        stats[0] = float((moe[..., :real] - dense[..., :real]).abs().max()) if real else 0.0
        stats[1] = float(dense[..., :real].abs().max()) if real else 0.0
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    diff, scale = float(stats[0]), float(stats[1])
    rtol = fp32_rtol(config) if rtol is None else rtol
    return Verification(diff, scale, atol + rtol * scale, tuple(tokens.shape))


def cast_parameters_(chunks: List[torch.nn.Module], dtype: torch.dtype) -> None:
    """Parameters (not buffers such as RoPE's inverse frequencies) to ``dtype``."""
    for chunk in chunks:
        for param in chunk.parameters():
            if param.dtype.is_floating_point and param.dtype != dtype:
                param.data = param.data.to(dtype)


def build_parts(moe_config: Config, dense_cfg: Config, source: DenseSource, hf_tensors, runtime):
    """(dense chunks loaded from the source, empty MoE chunks): this rank's parts."""
    dense_work = dense_layout_config(dense_cfg, moe_config)
    dense_chunks = build_model_chunks(dense_work, on_cpu=runtime.cpu_compat)
    load_source_(dense_chunks, source, dense_work, hf_tensors)
    moe_work = layout_config(moe_config, moe_config.train.dtype)
    return dense_chunks, build_model_chunks(moe_work, on_cpu=runtime.cpu_compat)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# Bytes per parameter a rank holds to train from the checkpoint: weights, the fp32 gradient
# buffer and Adam's fresh state (two fp32 moments; bf16 adds the fp32 main copy).
TRAINING_BYTES = {"fp32": 4 + 4 + 8, "bf16": 2 + 4 + 12}


def shard_mib(chunks: List[torch.nn.Module], dtype: str) -> float:
    """This rank's share: its parameters times ``TRAINING_BYTES`` (MiB)."""
    params = sum(p.numel() for chunk in chunks for p in chunk.parameters())
    return params * TRAINING_BYTES[dtype] / 2**20


def per_rank(value: float) -> List[float]:
    """``value`` of every rank, gathered to every rank (rounded to 0.1)."""
    mine = torch.tensor([value], dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [round(float(x), 1) for x in every]
