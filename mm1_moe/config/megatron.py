"""Conversion of our config tree to Megatron-core's ``TransformerConfig``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .schema import Config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def recompute_settings(config: Config, layers_per_group: int) -> dict:
    """``train.recompute`` as ``TransformerConfig`` fields. selective: Megatron checkpoints
    ``core_attn`` (our core-attention modules run inside its ``CheckpointFunction``), and the
    MoE layer recomputes its experts' SwiGLU itself (``MoELayer``, ``recompute_activation``).
    full: Megatron's ``uniform`` method, ``layers_per_group`` layers per checkpoint."""
    mode = config.train.recompute
    if mode == "selective":
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    if mode == "full":
        return dict(recompute_granularity="full", recompute_method="uniform",
                    recompute_num_layers=layers_per_group)
    return {}


def decoder_transformer_config(config: Config, use_cpu_initialization: bool = False):
    """The Megatron ``TransformerConfig`` of the Llama-style decoder (pre-RMSNorm, SwiGLU,
    RoPE, no biases, no dropout: MM1 pre-trains without it). ``use_cpu_initialization`` is set
    on CPU-only machines (gloo), which also picks gloo's p2p settings."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from ..runtime.megatron_patches import p2p_settings

    dec, par = config.model.decoder, config.parallel
    dtype = DTYPES[config.train.dtype]
    moe = {}
    if dec.moe.enabled:
        # Megatron needs the expert count to build expert-parallel groups and to scale MoE
        # losses in its schedules; the MoE layer itself is ours (mm1_moe.moe.MoELayer).
        moe = dict(num_moe_experts=dec.moe.num_experts, moe_router_topk=dec.moe.top_k,
                   moe_ffn_hidden_size=dec.moe.expert_ffn_hidden_size or dec.ffn_hidden_size,
                   moe_router_dtype="fp32")
    return TransformerConfig(
        **moe,
        num_layers=dec.num_layers,
        hidden_size=dec.hidden_size,
        num_attention_heads=dec.num_attention_heads,
        num_query_groups=dec.kv_heads,
        ffn_hidden_size=dec.ffn_hidden_size,
        kv_channels=dec.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=dec.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        init_method_std=dec.init_std,
        # Fused CUDA paths off: they have no CPU implementation and our kernels replace them.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=par.tensor_parallel,
        pipeline_model_parallel_size=par.pipeline_parallel,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline,
        expert_model_parallel_size=par.expert_parallel,
        expert_tensor_parallel_size=par.expert_tensor_parallel,
        sequence_parallel=par.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=use_cpu_initialization,
        **recompute_settings(config, config.train.recompute_num_layers),
        # gloo needs ordered, unbatched p2p (registry entry gloo_p2p)
        **p2p_settings(use_cpu_initialization, par.virtual_pipeline),
    )
