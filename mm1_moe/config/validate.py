"""Every cross-field rule of the config tree, in one place.

Rules that need the world size (how many ranks are left for data parallelism) are in
``validate_layout``, called at start-up; the rest run on load. Each error names the dotted paths
and their values, e.g. ``model.decoder.moe.num_experts (63) is not divisible by
parallel.expert_parallel (8)``.
"""

from __future__ import annotations

import math
from typing import List

from .loader import ConfigError
from .schema import Config


def _not_divisible(a_path: str, a: int, b_path: str, b: int) -> str:
    return f"{a_path} ({a}) is not divisible by {b_path} ({b})"


def _check_decoder(config: Config, errors: List[str]) -> None:
    dec, par = config.model.decoder, config.parallel
    p = "model.decoder"
    tp = par.tensor_parallel
    for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                 "vocab_size", "vocab_pad_multiple", "max_position_embeddings"):
        if getattr(dec, name) < 1:
            errors.append(f"{p}.{name} ({getattr(dec, name)}) must be >= 1")
    if errors:
        return
    if dec.hidden_size % dec.num_attention_heads:
        errors.append(_not_divisible(f"{p}.hidden_size", dec.hidden_size,
                                     f"{p}.num_attention_heads", dec.num_attention_heads))
    if dec.num_query_groups is not None and (
        dec.num_query_groups < 1 or dec.num_attention_heads % dec.num_query_groups
    ):
        errors.append(_not_divisible(f"{p}.num_attention_heads", dec.num_attention_heads,
                                     f"{p}.num_query_groups", dec.num_query_groups))
    for name, value in (("num_attention_heads", dec.num_attention_heads),
                        ("ffn_hidden_size", dec.ffn_hidden_size),
                        ("vocab_pad_multiple", dec.vocab_pad_multiple)):
        if value % tp:
            errors.append(_not_divisible(f"{p}.{name}", value, "parallel.tensor_parallel", tp))
    if dec.num_query_groups and dec.num_query_groups % tp:
        errors.append(_not_divisible(f"{p}.num_query_groups", dec.num_query_groups,
                                     "parallel.tensor_parallel", tp))
    chunks = par.pipeline_parallel * (par.virtual_pipeline or 1)
    if dec.num_layers % chunks:
        errors.append(
            f"{p}.num_layers ({dec.num_layers}) is not divisible by parallel.pipeline_parallel "
            f"({par.pipeline_parallel}) x parallel.virtual_pipeline ({par.virtual_pipeline or 1})"
        )
    if config.data.seq_length > dec.max_position_embeddings:
        errors.append(f"data.seq_length ({config.data.seq_length}) exceeds "
                      f"{p}.max_position_embeddings ({dec.max_position_embeddings})")


def _check_moe(config: Config, errors: List[str]) -> None:
    dec, moe, par = config.model.decoder, config.model.decoder.moe, config.parallel
    p = "model.decoder.moe"
    if moe.num_experts < 0:
        errors.append(f"{p}.num_experts ({moe.num_experts}) must be >= 0 (0 means dense)")
        return
    if not moe.enabled:
        if par.expert_parallel != 1:
            errors.append(f"parallel.expert_parallel ({par.expert_parallel}) needs MoE layers, "
                          f"but {p}.num_experts is 0")
        return
    if moe.num_experts % par.expert_parallel:
        errors.append(_not_divisible(f"{p}.num_experts", moe.num_experts,
                                     "parallel.expert_parallel", par.expert_parallel))
    if not 1 <= moe.top_k <= moe.num_experts:
        errors.append(f"{p}.top_k ({moe.top_k}) must be between 1 and {p}.num_experts "
                      f"({moe.num_experts})")
    if moe.capacity_factor is not None and moe.capacity_factor <= 0:
        errors.append(f"{p}.capacity_factor ({moe.capacity_factor}) must be > 0, "
                      "or null for dropless routing")
    if moe.expert_ffn_hidden_size is not None and moe.expert_ffn_hidden_size < 1:
        errors.append(f"{p}.expert_ffn_hidden_size ({moe.expert_ffn_hidden_size}) must be >= 1")
    for name in ("aux_loss_coeff", "z_loss_coeff", "router_jitter"):
        if getattr(moe, name) < 0:
            errors.append(f"{p}.{name} ({getattr(moe, name)}) must be >= 0")
    freq = moe.layer_freq
    if isinstance(freq, list):
        if len(freq) != dec.num_layers:
            errors.append(f"{p}.layer_freq has {len(freq)} entries but model.decoder.num_layers "
                          f"is {dec.num_layers}")
        elif any(v not in (0, 1) for v in freq):
            errors.append(f"{p}.layer_freq ({freq}) must contain only 0 and 1")
    elif not 1 <= freq <= dec.num_layers:
        errors.append(f"{p}.layer_freq ({freq}) must be between 1 and model.decoder.num_layers "
                      f"({dec.num_layers})")


def _check_vision(config: Config, errors: List[str]) -> None:
    vis, con = config.model.vision, config.model.connector
    patch_grid_ok = vis.patch_size >= 1 and vis.image_size % vis.patch_size == 0
    if not patch_grid_ok:
        errors.append(_not_divisible("model.vision.image_size", vis.image_size,
                                     "model.vision.patch_size", vis.patch_size))
    if vis.num_heads < 1 or vis.width % vis.num_heads:
        errors.append(_not_divisible("model.vision.width", vis.width,
                                     "model.vision.num_heads", vis.num_heads))
    side = math.isqrt(max(con.num_tokens, 0))
    if con.num_tokens < 1 or side * side != con.num_tokens:
        errors.append(f"model.connector.num_tokens ({con.num_tokens}) must be a square "
                      "(e.g. 64 or 144): the connector pools to a square grid")
    elif patch_grid_ok and con.num_tokens > vis.num_patches:
        errors.append(f"model.connector.num_tokens ({con.num_tokens}) exceeds the encoder's "
                      f"patches ({vis.num_patches} = (model.vision.image_size / patch_size)^2)")
    tp = config.parallel.tensor_parallel
    for name in ("num_heads", "mlp_dim"):
        if tp >= 1 and getattr(vis, name) % tp:
            errors.append(_not_divisible(f"model.vision.{name}", getattr(vis, name),
                                         "parallel.tensor_parallel", tp))
    token = config.model.image_token_id
    if token is not None and not 0 <= token < config.model.decoder.vocab_size:
        errors.append(f"model.image_token_id ({token}) must lie in [0, model.decoder.vocab_size "
                      f"({config.model.decoder.vocab_size}))")
    if con.depth < 1 or con.hidden_size < 1:
        errors.append(f"model.connector.depth ({con.depth}) and hidden_size "
                      f"({con.hidden_size}) must be >= 1")


def _check_parallel(config: Config, errors: List[str]) -> None:
    par = config.parallel
    for name in ("tensor_parallel", "pipeline_parallel", "expert_parallel"):
        if getattr(par, name) < 1:
            errors.append(f"parallel.{name} ({getattr(par, name)}) must be >= 1")
    if par.virtual_pipeline is not None:
        if par.virtual_pipeline < 1:
            errors.append(f"parallel.virtual_pipeline ({par.virtual_pipeline}) must be >= 1")
        elif par.pipeline_parallel < 2 and par.virtual_pipeline > 1:
            errors.append(f"parallel.virtual_pipeline ({par.virtual_pipeline}) needs "
                          f"parallel.pipeline_parallel > 1 (is {par.pipeline_parallel})")
    if par.sequence_parallel and par.tensor_parallel == 1:
        errors.append("parallel.sequence_parallel needs parallel.tensor_parallel > 1")
    if par.expert_tensor_parallel != 1:
        errors.append(f"parallel.expert_tensor_parallel ({par.expert_tensor_parallel}) must be 1: "
                      "the MoE layer keeps whole experts on each rank")


def _check_train(config: Config, errors: List[str]) -> None:
    tr = config.train
    if tr.steps < 1:
        errors.append(f"train.steps ({tr.steps}) must be >= 1")
    if tr.micro_batch_size < 1 or tr.global_batch_size < 1:
        errors.append(f"train.micro_batch_size ({tr.micro_batch_size}) and "
                      f"train.global_batch_size ({tr.global_batch_size}) must be >= 1")
    elif tr.global_batch_size % tr.micro_batch_size:
        errors.append(_not_divisible("train.global_batch_size", tr.global_batch_size,
                                     "train.micro_batch_size", tr.micro_batch_size))
    if tr.lr is not None and tr.lr <= 0:
        errors.append(f"train.lr ({tr.lr}) must be > 0, or null for MM1's law")
    if not 0.0 <= tr.min_lr_ratio <= 1.0:
        errors.append(f"train.min_lr_ratio ({tr.min_lr_ratio}) must be within [0, 1]")
    if tr.warmup_steps < 0:
        errors.append(f"train.warmup_steps ({tr.warmup_steps}) must be >= 0")
    if tr.save_interval < 0:
        errors.append(f"train.save_interval ({tr.save_interval}) must be >= 0 (0: final only)")
    if tr.peak_tflops is not None and tr.peak_tflops <= 0:
        errors.append(f"train.peak_tflops ({tr.peak_tflops}) must be > 0, or null")
    if tr.grad_clip < 0:
        errors.append(f"train.grad_clip ({tr.grad_clip}) must be >= 0 (0 disables)")
    data = config.data
    if len(data.weights) != 3 or any(w < 0 for w in data.weights) or sum(data.weights) <= 0:
        errors.append(f"data.weights ({data.weights}) must be 3 non-negative weights "
                      "(interleaved, captions, text) with a positive sum")
    if data.pack_window < 1:
        errors.append(f"data.pack_window ({data.pack_window}) must be >= 1")
    if data.source == "mm1_mixture" and config.model.image_token_id is None:
        errors.append("data.source (mm1_mixture) feeds images: set model.image_token_id to the "
                      "tokenizer's <image> id")
    if config.data.seq_length < 2:
        errors.append(f"data.seq_length ({config.data.seq_length}) must be >= 2")


def validate(config: Config) -> Config:
    """Check every rule that does not depend on the world size; raise one ConfigError listing
    all failures."""
    errors: List[str] = []
    _check_parallel(config, errors)
    if not errors:
        _check_decoder(config, errors)
        _check_moe(config, errors)
    _check_vision(config, errors)
    _check_train(config, errors)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return config


def data_parallel_size(config: Config, world_size: int) -> int:
    """Ranks left for data parallelism once tensor and pipeline parallelism take theirs."""
    par = config.parallel
    model_parallel = par.tensor_parallel * par.pipeline_parallel
    if world_size % model_parallel:
        raise ConfigError(
            f"world size ({world_size}) is not divisible by parallel.tensor_parallel "
            f"({par.tensor_parallel}) x parallel.pipeline_parallel ({par.pipeline_parallel})"
        )
    return world_size // model_parallel


def validate_layout(config: Config, world_size: int) -> int:
    """Rules that depend on the world size; returns the data-parallel size."""
    dp = data_parallel_size(config, world_size)
    par, tr = config.parallel, config.train
    errors = []
    etp = par.expert_tensor_parallel
    expert_ranks = par.expert_parallel * etp * par.pipeline_parallel
    if world_size % expert_ranks:
        errors.append(
            f"world size ({world_size}) is not divisible by parallel.expert_parallel "
            f"({par.expert_parallel}) x expert tensor parallel ({etp}) x "
            f"parallel.pipeline_parallel ({par.pipeline_parallel})"
        )
    if tr.global_batch_size % (tr.micro_batch_size * dp):
        errors.append(
            f"train.global_batch_size ({tr.global_batch_size}) is not divisible by "
            f"train.micro_batch_size ({tr.micro_batch_size}) x data-parallel size ({dp})"
        )
    if errors:
        raise ConfigError("invalid layout:\n  " + "\n  ".join(errors))
    return dp
