"""The CLIP-style ViT image encoder (MM1: ViT-H/14 at 378 px), built from Megatron-core specs.

Shapes: I images, H x H pixels, p patch size, G = H / p patches per side, P = G * G patches,
W width, M MLP width.

    images [I, 3, H, H] -> patch conv (no bias) -> [I, P, W] -> prepend CLS -> [I, 1 + P, W]
    -> + position embedding (bicubic-interpolated when G differs from the configured grid)
    -> pre-LayerNorm -> [1 + P, I, W] -> depth x TransformerLayer (pre-LN, bidirectional
    attention, GELU MLP, all with biases) -> drop CLS -> [I, P, W]

The output is Hugging Face ``CLIPVisionModel``'s ``last_hidden_state[:, 1:]``: CLIP's
``post_layernorm`` normalises only the pooled CLS vector, which MM1's connector never reads, so
this module does not hold it (``mm1_moe.interop.clip`` checks it in a checkpoint and drops it).

Transformer layers are Megatron ``TransformerLayer``s with Column/RowParallelLinear projections
(the decoder's attention and MLP specs with ``AttnMaskType.no_mask``), so the encoder shards
with tensor parallelism like the decoder. The embeddings and the pre-LayerNorm are replicated.

Why not ``megatron.core.models.vision.clip_vit_model.CLIPViTModel`` (0.16.1): its constructor
moves a buffer with ``Tensor.cuda()`` (which no module proxy can serve on CPU), its norm default
without Transformer Engine (``torch.nn.LayerNorm``) cannot take the ``config=`` argument it is
built with, its local layer spec is causal, it has no position-embedding interpolation, and it
returns the CLS row. Patching all five is longer than this module.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.activations import quick_gelu
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.enums import AttnMaskType, ModelType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from torch import nn

from ..config import Config
from ..config.megatron import DTYPES, recompute_settings
from .decoder import attention_spec, dense_mlp_spec
from .param_init import ParamInit, normal

ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu}  # HF "gelu" is the exact (erf) GELU


def vision_transformer_config(config: Config, use_cpu_initialization: bool = False) -> TransformerConfig:
    """The Megatron ``TransformerConfig`` of the ViT: LayerNorm with bias, biased projections,
    non-gated GELU/quick-GELU MLP, no dropout. It shares the decoder's tensor-parallel size but
    never pipelines (the whole encoder lives on the first stage) and never runs sequence
    parallel (its sequence is one image's patches)."""
    vis, par = config.model.vision, config.parallel
    dtype = DTYPES[config.train.dtype]
    return TransformerConfig(
        num_layers=vis.depth,
        hidden_size=vis.width,
        num_attention_heads=vis.num_heads,
        ffn_hidden_size=vis.mlp_dim,
        kv_channels=vis.width // vis.num_heads,
        normalization="LayerNorm",
        layernorm_epsilon=vis.layernorm_eps,
        gated_linear_unit=False,
        activation_func=ACTIVATIONS[vis.activation],
        add_bias_linear=True,
        add_qkv_bias=True,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        init_method_std=config.model.decoder.init_std,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=par.tensor_parallel,
        pipeline_model_parallel_size=1,
        sequence_parallel=False,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=use_cpu_initialization,
        # full: one checkpoint per ViT layer (train.recompute_num_layers counts decoder layers)
        **recompute_settings(config, layers_per_group=1),
    )


def vision_layer_spec(config: Config) -> ModuleSpec:
    """One ViT layer: pre-LayerNorm, bidirectional self-attention, pre-LayerNorm, MLP."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=attention_spec(config, mask=AttnMaskType.no_mask),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=dense_mlp_spec(),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def interpolate_positions(table: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Position table [1 + G * G, W] (CLS first) -> [1 + grid_h * grid_w, W]: the CLS row kept,
    the G x G patch grid resized bicubically with align_corners=False, as HF CLIP's
    ``interpolate_pos_encoding`` (computed in fp32 whatever the table's dtype)."""
    G, W = math.isqrt(table.shape[0] - 1), table.shape[1]
    if G * G != table.shape[0] - 1:
        raise ValueError(f"position table of {table.shape[0] - 1} patches is not a square grid")
    patches_1WGG = table[1:].float().reshape(1, G, G, W).permute(0, 3, 1, 2)
    resized = F.interpolate(patches_1WGG, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    resized_PW = resized.permute(0, 2, 3, 1).reshape(grid_h * grid_w, W).to(table.dtype)
    return torch.cat([table[:1], resized_PW])


class VisionEmbeddings(nn.Module):
    """Patch conv, CLS token and learned positions (names as in HF ``CLIPVisionEmbeddings``)."""

    def __init__(self, image_size: int, patch_size: int, width: int, dtype: torch.dtype):
        super().__init__()
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.patch_embedding = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False,
                                         dtype=dtype)
        self.class_embedding = nn.Parameter(torch.empty(width, dtype=dtype))
        self.param_init("class_embedding").init_(self.class_embedding)
        self.position_embedding = nn.Embedding(self.grid**2 + 1, width, dtype=dtype)

    def param_init(self, name: str) -> ParamInit:
        """The CLS token's N(0, W^-0.5), as CLIP's. The patch conv and the position table are
        torch layers with torch's defaults (``mm1_moe.models.param_init``)."""
        return {"class_embedding": normal(self.class_embedding.shape[0] ** -0.5)}[name]

    def positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """[1 + grid_h * grid_w, W]: the table itself at the configured grid, else
        :func:`interpolate_positions`."""
        table = self.position_embedding.weight
        if (grid_h, grid_w) == (self.grid, self.grid):
            return table
        return interpolate_positions(table, grid_h, grid_w)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[I, 3, H, W'] -> [I, 1 + P, W] (sides must be multiples of the patch size)."""
        I, _, h, w = images.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size "
                             f"{self.patch_size}")
        patches = self.patch_embedding(images.to(self.patch_embedding.weight.dtype))
        patches_IPW = patches.flatten(2).transpose(1, 2)
        cls_I1W = self.class_embedding.expand(I, 1, -1)
        x_IPW = torch.cat([cls_I1W, patches_IPW], dim=1)
        return x_IPW + self.positions(h // self.patch_size, w // self.patch_size)


class VisionTransformer(MegatronModule):
    """CLIP ViT: images [I, 3, H, H] -> last hidden states without CLS [I, P, W].

    ``transformer_config`` defaults to :func:`vision_transformer_config` of ``config``."""

    def __init__(self, config: Config, transformer_config: Optional[TransformerConfig] = None):
        transformer_config = transformer_config or vision_transformer_config(config)
        super().__init__(config=transformer_config)
        vis = config.model.vision
        self.model_type = ModelType.encoder_or_decoder
        self.embeddings = VisionEmbeddings(vis.image_size, vis.patch_size, vis.width,
                                           transformer_config.params_dtype)
        self.pre_layernorm = nn.LayerNorm(vis.width, eps=vis.layernorm_eps,
                                          dtype=transformer_config.params_dtype)
        layers = [vision_layer_spec(config) for _ in range(vis.depth)]
        self.transformer = TransformerBlock(
            config=transformer_config,
            spec=TransformerBlockSubmodules(layer_specs=layers, layer_norm=WrappedTorchNorm),
            pre_process=True,
            post_process=False,  # no final norm: CLIP's last_hidden_state is un-normalised
        )

    @property
    def num_patches(self) -> int:
        return self.embeddings.grid**2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[I, 3, H, W'] -> [I, P, W] with P = (H / p) * (W' / p)."""
        x_IPW = self.pre_layernorm(self.embeddings(images))
        x_PIW = x_IPW.transpose(0, 1).contiguous()  # Megatron layers take [s, b, h]
        x_PIW = self.transformer(hidden_states=x_PIW, attention_mask=None)
        return x_PIW[1:].transpose(0, 1).contiguous()

