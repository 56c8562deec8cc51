"""Hugging Face ``CLIPVisionModel`` -> our ViT (``mm1_moe.models.vision.VisionTransformer``).

DFN5B-CLIP ViT-H/14-378, MM1's encoder, is published in this format. Checkpoint files name the
tensors ``vision_model.<name>``; transformers >= 5 drops that prefix from
``CLIPVisionModel.state_dict()``. Either spelling is accepted. Name map (HF without
the prefix -> ours, per layer i; W width, hd = W / heads):
  embeddings.class_embedding            -> embeddings.class_embedding
  embeddings.patch_embedding.weight     -> embeddings.patch_embedding.weight (conv, no bias)
  embeddings.position_embedding.weight  -> embeddings.position_embedding.weight
  pre_layrnorm.{weight,bias}            -> pre_layernorm.{weight,bias}
  encoder.layers.i.layer_norm1          -> transformer.layers.i.input_layernorm
  encoder.layers.i.self_attn.{q,k,v}_proj.{weight,bias}
                                        -> transformer.layers.i.self_attention.linear_qkv
      Megatron interleaves per head: rows [q0, k0, v0, q1, k1, v1, ...] of hd each, so a
      tensor-parallel split keeps whole heads: [3 * W, W] and [3 * W].
  encoder.layers.i.self_attn.out_proj   -> transformer.layers.i.self_attention.linear_proj
  encoder.layers.i.layer_norm2          -> transformer.layers.i.pre_mlp_layernorm
  encoder.layers.i.mlp.fc1 / fc2        -> transformer.layers.i.mlp.linear_fc1 / fc2
  post_layernorm.{weight,bias}          -> (checked, then dropped: CLIP applies it to the pooled
                                           CLS vector only, which MM1 never reads)

Every tensor is accounted for: a missing, unexpected or mis-shaped one raises ``InteropError``
naming it. Loading goes through Megatron's sharded state dict, so any TP layout loads the same
checkpoint.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Union

import torch

from ..config import Config
from ..models.init import fill_from_global_
from .llama import InteropError, _check_names, _check_shape

PREFIX = "vision_model."
# HF keeps ``position_ids`` as a buffer (non-persistent in transformers >= 4.31, saved before).
IGNORED = ("embeddings.position_ids",)


def clip_vision_config(config: Config):
    """The ``transformers.CLIPVisionConfig`` with the same architecture as our ViT."""
    from transformers import CLIPVisionConfig

    vis = config.model.vision
    return CLIPVisionConfig(
        hidden_size=vis.width,
        intermediate_size=vis.mlp_dim,
        num_hidden_layers=vis.depth,
        num_attention_heads=vis.num_heads,
        num_channels=3,
        image_size=vis.image_size,
        patch_size=vis.patch_size,
        hidden_act=vis.activation,
        layer_norm_eps=vis.layernorm_eps,
        attention_dropout=0.0,
    )


def _layer_map(i: int) -> Dict[str, str]:
    """HF -> ours for layer ``i``'s tensors that copy one to one."""
    h, o = f"encoder.layers.{i}", f"transformer.layers.{i}"
    pairs = {"layer_norm1": "input_layernorm", "layer_norm2": "pre_mlp_layernorm",
             "self_attn.out_proj": "self_attention.linear_proj",
             "mlp.fc1": "mlp.linear_fc1", "mlp.fc2": "mlp.linear_fc2"}
    return {f"{h}.{a}.{kind}": f"{o}.{b}.{kind}" for a, b in pairs.items() for kind in ("weight", "bias")}


def _expected_shapes(config: Config) -> Dict[str, tuple]:
    """Every tensor of a ``CLIPVisionModel`` state dict with ``config``'s ViT, and its shape."""
    vis = config.model.vision
    W, M, p = vis.width, vis.mlp_dim, vis.patch_size
    shapes = {
        "embeddings.class_embedding": (W,),
        "embeddings.patch_embedding.weight": (W, 3, p, p),
        "embeddings.position_embedding.weight": (vis.num_patches + 1, W),
        "pre_layrnorm.weight": (W,), "pre_layrnorm.bias": (W,),
        "post_layernorm.weight": (W,), "post_layernorm.bias": (W,),
    }
    for i in range(vis.depth):
        h = f"encoder.layers.{i}"
        for n in ("layer_norm1", "layer_norm2"):
            shapes.update({f"{h}.{n}.weight": (W,), f"{h}.{n}.bias": (W,)})
        for n in ("q", "k", "v", "out"):
            shapes.update({f"{h}.self_attn.{n}_proj.weight": (W, W), f"{h}.self_attn.{n}_proj.bias": (W,)})
        shapes.update({f"{h}.mlp.fc1.weight": (M, W), f"{h}.mlp.fc1.bias": (M,),
                       f"{h}.mlp.fc2.weight": (W, M), f"{h}.mlp.fc2.bias": (W,)})
    return shapes


def _fuse_qkv(hf: Mapping[str, torch.Tensor], i: int, kind: str, heads: int) -> torch.Tensor:
    """[q; k; v] of layer ``i`` -> Megatron's per-head interleaved [heads * 3 * hd, ...]."""
    h = f"encoder.layers.{i}.self_attn"
    q, k, v = (hf[f"{h}.{n}_proj.{kind}"] for n in "qkv")
    rest = q.shape[1:]
    per_head = [t.reshape(heads, -1, *rest) for t in (q, k, v)]
    return torch.cat(per_head, dim=1).reshape(-1, *rest)


def _unprefixed(hf: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The state dict with ``vision_model.`` stripped (both spellings -> one); ignored buffers out."""
    out: Dict[str, torch.Tensor] = {}
    for key, value in hf.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if name in out:
            raise InteropError(f"{name} appears both with and without the '{PREFIX}' prefix")
        if name not in IGNORED:
            out[name] = value
    return out


def vit_from_clip(hf: Mapping[str, torch.Tensor], config: Config) -> Dict[str, torch.Tensor]:
    """Our ViT's full (unsharded) state dict, in its own names, from a ``CLIPVisionModel``
    state dict. Strict: see the module docstring."""
    vis = config.model.vision
    hf = _unprefixed(hf)
    shapes = _expected_shapes(config)
    _check_names(hf, set(shapes), "CLIP vision")
    for name, shape in shapes.items():
        _check_shape(name, hf[name], shape)
    out = {
        "embeddings.class_embedding": hf["embeddings.class_embedding"],
        "embeddings.patch_embedding.weight": hf["embeddings.patch_embedding.weight"],
        "embeddings.position_embedding.weight": hf["embeddings.position_embedding.weight"],
        "pre_layernorm.weight": hf["pre_layrnorm.weight"],
        "pre_layernorm.bias": hf["pre_layrnorm.bias"],
    }
    for i in range(vis.depth):
        out.update({ours: hf[theirs] for theirs, ours in _layer_map(i).items()})
        for kind in ("weight", "bias"):
            out[f"transformer.layers.{i}.self_attention.linear_qkv.{kind}"] = _fuse_qkv(hf, i, kind, vis.num_heads)
    return out


def _vision_modules(target) -> List[torch.nn.Module]:
    """The ViTs in ``target``: a ViT, an MM1Model, or a list of (DDP-wrapped) model chunks;
    chunks without an encoder (pipeline stages after the first) contribute nothing."""
    from ..models.vision import VisionTransformer

    items = [target] if isinstance(target, torch.nn.Module) else list(target)
    found = []
    for item in items:
        while not isinstance(item, VisionTransformer) and hasattr(item, "module"):
            item = item.module  # DDP / Float16Module wrappers
        if isinstance(item, VisionTransformer):
            found.append(item)
        elif getattr(item, "vision_model", None) is not None:
            found.append(item.vision_model)
    return found


def load_clip_vision_(target: Union[torch.nn.Module, Iterable[torch.nn.Module]],
                      hf: Mapping[str, torch.Tensor], config: Config) -> int:
    """Load a ``CLIPVisionModel`` state dict into the ViT of ``target`` (a ViT, an MM1Model or
    this rank's model chunks; any TP layout). Every ViT parameter must be found; returns the
    number of tensors set (0 on ranks that hold no encoder, after checking the checkpoint)."""
    full = vit_from_clip(hf, config)

    def lookup(name: str, shape) -> torch.Tensor:
        if name not in full:
            raise InteropError(f"model tensor {name} has no source in the CLIP vision checkpoint")
        return full[name]

    return fill_from_global_(_vision_modules(target), lookup)
