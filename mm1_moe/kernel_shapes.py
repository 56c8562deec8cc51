"""The shapes at which a config runs our kernels, as the plain dict ``mm1_moe.kernels.report``
takes (kernels/ knows nothing of configs; see its docstring for the keys).

Shape legend: T tokens, D model width, F expert FFN width, E experts, K top-k; B batch, S
sequence, H heads, Dh head dim.

Per micro-batch and per layer call, as one process runs them without model parallelism:
  MoE       T = micro_batch_size * seq_length tokens, D, F = the expert FFN width, E, K; the
            expert-parallel size picks the dispatcher path (1: fused gather; > 1: all-to-all
            with E / ep local experts). Tensor/sequence parallelism splits T over ranks: that
            changes grids, not what is compiled. Training always routes with a token mask
            (training/loop.py's routing_mask) and recomputes fc1 under train.recompute=selective.
  RMSNorm   the decoder's, over the same T tokens of width D.
  attention the decoder's (causal, packed documents: training passes cu_seqlens) with B =
            micro_batch_size, S = seq_length; and the ViT's (bidirectional, no documents) with
            B = micro_batch_size * max_images_per_sequence images of S = 1 + patches tokens
            (the class token), whether or not this config builds the image tower.
"""

from __future__ import annotations

from typing import Dict

from .config.schema import Config


def kernel_shapes(config: Config) -> Dict[str, object]:
    """The report's shape dict for ``config`` (``moe`` is None for a dense decoder)."""
    dec, vis = config.model.decoder, config.model.vision
    micro_batch, seq = config.train.micro_batch_size, config.data.seq_length
    T = micro_batch * seq
    moe = None
    if dec.moe.enabled:
        moe = {"tokens": T, "hidden": dec.hidden_size,
               "ffn": dec.moe.expert_ffn_hidden_size or dec.ffn_hidden_size,
               "experts": dec.moe.num_experts, "top_k": dec.moe.top_k,
               "expert_parallel": config.parallel.expert_parallel,
               "router_order": dec.moe.router_order, "normalize_topk": dec.moe.normalize_topk,
               "token_mask": True, "recompute_fc1": config.train.recompute == "selective"}
    decoder_attention = {"name": "decoder", "batch": micro_batch, "seq": seq,
                         "heads": dec.num_attention_heads, "kv_heads": dec.kv_heads,
                         "head_dim": dec.head_dim, "causal": True, "documents": True}
    vit_attention = {"name": "vit", "batch": micro_batch * config.data.max_images_per_sequence,
                     "seq": 1 + vis.num_patches, "heads": vis.num_heads,
                     "kv_heads": vis.num_heads, "head_dim": vis.width // vis.num_heads,
                     "causal": False, "documents": False}
    return {"name": config.model.name, "dtype": "bf16" if config.train.dtype == "bf16" else "fp32",
            "moe": moe, "norm": {"tokens": T, "hidden": dec.hidden_size},
            "attention": [decoder_attention, vit_attention]}
