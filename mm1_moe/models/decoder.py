"""The Llama-style MM1 decoder, built from Megatron-core specs.

Each decoder layer is a Megatron ``TransformerLayer`` whose submodules come from a spec here:
pre-RMSNorm, self-attention (fused QKV, RoPE, grouped-query), SwiGLU MLP, no biases. Kernels of
ours plug in as submodules of these specs (core attention, the MoE FFN), never by forking
Megatron's modules. Pipeline stages build only their own layers (``pre_process`` holds the
embedding, ``post_process`` the final norm and output layer).
"""

from __future__ import annotations

from typing import List, Optional

from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from ..config import Config
from ..moe.layer import MoELayer
from ..runtime.process import kernel_for
from .attention import FlashAttnAttention, SDPAAttention, TritonAttention
from .norm import RMSNorm

CORE_ATTENTION = {"local": DotProductAttention, "triton": TritonAttention,
                  "sdpa": SDPAAttention, "flash_attn": FlashAttnAttention}


def core_attention_class(name: str) -> type:
    """``kernels.attention`` -> the core-attention submodule (``auto``: as the runtime chose)."""
    return CORE_ATTENTION[kernel_for("attention", name)]


def attention_spec(config: Config, mask: AttnMaskType = AttnMaskType.causal) -> ModuleSpec:
    """Self-attention: fused QKV column-parallel projection, core attention, output projection."""
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": mask},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=core_attention_class(config.kernels.attention),
            linear_proj=RowParallelLinear,
            q_layernorm=IdentityOp,
            k_layernorm=IdentityOp,
        ),
    )


def dense_mlp_spec() -> ModuleSpec:
    """SwiGLU FFN: fc1 holds [gate; up] (gated_linear_unit in the TransformerConfig)."""
    return ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
    )


def moe_mlp_spec(config: Config) -> ModuleSpec:
    """Our MoE FFN (route -> dispatch -> experts -> combine) in the layer's ``mlp`` slot."""
    moe = config.model.decoder.moe
    return ModuleSpec(
        module=MoELayer,
        params={"moe": moe, "kernels": config.kernels.moe,
                "ffn_hidden_size": moe.expert_ffn_hidden_size or config.model.decoder.ffn_hidden_size,
                "recompute_activation": config.train.recompute == "selective"},
    )


def norm_spec(config: Config) -> ModuleSpec:
    """The decoder's RMSNorm (``kernels.norm``: our fused kernel or torch's)."""
    return ModuleSpec(module=RMSNorm, params={"kernel": kernel_for("norm", config.kernels.norm)})


def decoder_layer_spec(config: Config, layer_index: int) -> ModuleSpec:
    """The spec of global decoder layer ``layer_index`` (dense or MoE FFN)."""
    moe_layer = config.model.decoder.is_moe_layer(layer_index)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm_spec(config),
            self_attention=attention_spec(config),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm_spec(config),
            mlp=moe_mlp_spec(config) if moe_layer else dense_mlp_spec(),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def stage_layer_indices(config: Config, pp_rank: int, vp_stage: Optional[int] = None) -> List[int]:
    """Global indices of the decoder layers held by pipeline rank ``pp_rank`` (and virtual
    stage ``vp_stage``), in Megatron's even split."""
    par, n = config.parallel, config.model.decoder.num_layers
    vpp = par.virtual_pipeline or 1
    per_chunk = n // (par.pipeline_parallel * vpp)
    chunk = (vp_stage or 0) * par.pipeline_parallel + pp_rank
    return list(range(chunk * per_chunk, (chunk + 1) * per_chunk))


def decoder_block_spec(config: Config, pp_rank: int, vp_stage: Optional[int] = None):
    """Per-layer specs of this stage's layers, so MoE and dense layers can alternate."""
    layers = [decoder_layer_spec(config, i) for i in stage_layer_indices(config, pp_rank, vp_stage)]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=norm_spec(config))


def build_decoder(
    config: Config,
    transformer_config: TransformerConfig,
    pre_process: bool = True,
    post_process: bool = True,
    pp_rank: int = 0,
    vp_stage: Optional[int] = None,
    scatter_embedding_sequence_parallel: bool = True,
) -> GPTModel:
    """This pipeline stage's part of the decoder, as a Megatron ``GPTModel``."""
    dec = config.model.decoder
    return GPTModel(
        config=transformer_config,
        transformer_layer_spec=decoder_block_spec(config, pp_rank, vp_stage),
        vocab_size=dec.padded_vocab_size,
        max_sequence_length=dec.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=dec.rope_theta,
        scatter_embedding_sequence_parallel=scatter_embedding_sequence_parallel,
        vp_stage=vp_stage,
    )
