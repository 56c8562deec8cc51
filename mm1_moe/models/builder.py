"""Build this rank's model chunks and wrap them for data-parallel training."""

from __future__ import annotations

from typing import List

import torch

from ..config import Config
from ..config.megatron import decoder_transformer_config
from .decoder import build_decoder
from .init import layout_invariant_init_
from .mm1 import MM1Model


def build_model_chunks(config: Config, on_cpu: bool) -> List[torch.nn.Module]:
    """This rank's model chunks (a decoder, or MM1 when ``model.image_token_id`` is set): one
    per virtual pipeline stage (one without interleaving).
    ``on_cpu`` initialises weights on the CPU (Megatron's ``use_cpu_initialization``), which also
    makes Megatron's init independent of the tensor-parallel size."""
    from megatron.core import parallel_state as ps

    transformer_config = decoder_transformer_config(config, use_cpu_initialization=on_cpu)
    pp_rank = ps.get_pipeline_model_parallel_rank()
    vpp = config.parallel.virtual_pipeline
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        first = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        last = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        if config.model.image_token_id is None:  # text-only decoder
            chunk = build_decoder(config, transformer_config, first, last, pp_rank, stage)
            _apply_freezing(config, chunk)
        else:  # MM1: ViT + connector with the embedding on the first stage; freezes per part
            chunk = MM1Model(config, transformer_config, first, last, pp_rank, stage,
                             image_token_id=config.model.image_token_id)
        if not on_cpu:
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    if config.model.layout_invariant_init:
        layout_invariant_init_(chunks, config)
    return chunks


def _apply_freezing(config: Config, chunk: torch.nn.Module) -> None:
    if config.model.decoder.freeze:
        chunk.requires_grad_(False)


def wrap_ddp(config: Config, chunks: List[torch.nn.Module], distributed_optimizer: bool = False):
    """Megatron's DDP around each chunk: contiguous grad buffers (fp32 unless
    ``train.grad_reduce_in_fp32`` is off in a bf16 run), bucketed all-reduce (or reduce-scatter
    with the distributed optimizer) over the data-parallel group."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=config.train.grad_reduce_in_fp32,
        use_distributed_optimizer=distributed_optimizer,
    )
    return [
        DistributedDataParallel(chunk.config, ddp_config, chunk,
                                disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
