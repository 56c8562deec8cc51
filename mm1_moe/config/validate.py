"""Every rule of the config tree, in one place: the range of each size, count and rate, and the
rules between fields (a rule that divides by a size runs only once that size is valid).

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


def _at_least(errors: List[str], section: str, obj, names, low: int = 1, why: str = "") -> bool:
    """``<section>.<name> (value) must be >= low`` for each named field below ``low`` (a None
    Optional is left alone); True when all passed, so a caller can skip the rules that divide by
    them."""
    ok = True
    for name in names:
        value = getattr(obj, name)
        if value is not None and value < low:
            errors.append(f"{section}.{name} ({value}) must be >= {low}{why}")
            ok = False
    return ok


def _positive(errors: List[str], section: str, obj, names) -> None:
    """Float fields that must be > 0 (epsilons, scales); None is left alone."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not value > 0:
            errors.append(f"{section}.{name} ({value}) must be > 0")


def _check_decoder(config: Config, errors: List[str], parallel_ok: bool) -> None:
    dec, par = config.model.decoder, config.parallel
    p = "model.decoder"
    # rope_theta is the base of the RoPE frequencies theta^(-2i/hd); norm_eps keeps RMSNorm finite
    # on an all-zero row; init_std 0 would start every weight at 0 (no symmetry breaking)
    _positive(errors, p, dec, ("rope_theta", "norm_eps", "init_std"))
    if not _at_least(errors, p, dec, ("num_layers", "hidden_size", "num_attention_heads",
                                      "num_query_groups", "ffn_hidden_size", "vocab_size",
                                      "vocab_pad_multiple", "max_position_embeddings")):
        return
    if dec.hidden_size % dec.num_attention_heads:
        errors.append(_not_divisible(f"{p}.hidden_size", dec.hidden_size,
                                     f"{p}.num_attention_heads", dec.num_attention_heads))
    if dec.num_query_groups is not None and dec.num_attention_heads % dec.num_query_groups:
        errors.append(_not_divisible(f"{p}.num_attention_heads", dec.num_attention_heads,
                                     f"{p}.num_query_groups", dec.num_query_groups))
    if config.data.seq_length > dec.max_position_embeddings:
        errors.append(f"data.seq_length ({config.data.seq_length}) exceeds "
                      f"{p}.max_position_embeddings ({dec.max_position_embeddings})")
    if not parallel_ok:  # the rules below divide by the parallel sizes
        return
    tp = par.tensor_parallel
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


def _check_moe(config: Config, errors: List[str], parallel_ok: bool) -> None:
    dec, moe, par = config.model.decoder, config.model.decoder.moe, config.parallel
    p = "model.decoder.moe"
    # Signs and ranges hold whether or not the decoder is MoE (a dense config keeps these fields
    # for a later upcycle); the rules between fields below apply only with experts.
    experts_ok = _at_least(errors, p, moe, ("num_experts",), 0, " (0 means dense)")
    _at_least(errors, p, moe, ("top_k", "expert_ffn_hidden_size"))
    if moe.capacity_factor is not None and not moe.capacity_factor > 0:
        errors.append(f"{p}.capacity_factor ({moe.capacity_factor}) must be > 0, "
                      "or null for dropless routing")
    for name in ("aux_loss_coeff", "z_loss_coeff"):
        if not getattr(moe, name) >= 0:
            errors.append(f"{p}.{name} ({getattr(moe, name)}) must be >= 0")
    if not moe.bias_update_rate >= 0:
        errors.append(f"{p}.bias_update_rate ({moe.bias_update_rate}) must be >= 0")
    # jitter scales the router input by U(1 - eps, 1 + eps): eps >= 1 can zero or flip its sign
    if not 0 <= moe.router_jitter < 1:
        errors.append(f"{p}.router_jitter ({moe.router_jitter}) must be >= 0 and < 1 "
                      "(0 disables)")
    freq = moe.layer_freq
    if not isinstance(freq, list) and (freq < 1 or moe.enabled and freq > dec.num_layers):
        errors.append(f"{p}.layer_freq ({freq}) must be between 1 and model.decoder.num_layers "
                      f"({dec.num_layers})")
    if not experts_ok:
        return
    if parallel_ok and not moe.enabled and par.expert_parallel != 1:
        errors.append(f"parallel.expert_parallel ({par.expert_parallel}) needs MoE layers, "
                      f"but {p}.num_experts is 0")
    if not moe.enabled:
        return
    if parallel_ok and moe.num_experts % par.expert_parallel:
        errors.append(_not_divisible(f"{p}.num_experts", moe.num_experts,
                                     "parallel.expert_parallel", par.expert_parallel))
    if moe.top_k > moe.num_experts:
        errors.append(f"{p}.top_k ({moe.top_k}) must be between 1 and {p}.num_experts "
                      f"({moe.num_experts})")
    if isinstance(freq, list):
        if len(freq) != dec.num_layers:
            errors.append(f"{p}.layer_freq has {len(freq)} entries but model.decoder.num_layers "
                          f"is {dec.num_layers}")
        elif any(v not in (0, 1) for v in freq):
            errors.append(f"{p}.layer_freq ({freq}) must contain only 0 and 1")


def _check_vision(config: Config, errors: List[str]) -> None:
    """ViT and connector. Checked for a text-only model too (model.image_token_id null): the
    tower is not built then, but ``mm1-moe info`` counts it (width 0 gave negative counts)."""
    vis, con = config.model.vision, config.model.connector
    v = "model.vision"
    _at_least(errors, v, vis, ("image_size", "patch_size", "width", "depth", "num_heads",
                               "mlp_dim"))
    _positive(errors, v, vis, ("layernorm_eps",))
    patch_grid_ok = min(vis.patch_size, vis.image_size) >= 1
    if patch_grid_ok and vis.image_size % vis.patch_size:
        patch_grid_ok = False
        errors.append(_not_divisible(f"{v}.image_size", vis.image_size,
                                     f"{v}.patch_size", vis.patch_size))
    if min(vis.num_heads, vis.width) >= 1 and vis.width % vis.num_heads:
        errors.append(_not_divisible(f"{v}.width", vis.width, f"{v}.num_heads", vis.num_heads))
    side = math.isqrt(max(con.num_tokens, 0))
    if con.num_tokens < 1 or side * side != con.num_tokens:
        errors.append(f"model.connector.num_tokens ({con.num_tokens}) must be a square "
                      "(e.g. 64 or 144): the connector pools to a square grid")
    elif patch_grid_ok and con.num_tokens > vis.num_patches:
        errors.append(f"model.connector.num_tokens ({con.num_tokens}) exceeds the encoder's "
                      f"patches ({vis.num_patches} = (model.vision.image_size / patch_size)^2)")
    _at_least(errors, "model.connector", con, ("hidden_size", "depth"))
    tp = config.parallel.tensor_parallel
    for name in ("num_heads", "mlp_dim"):
        if tp >= 1 and getattr(vis, name) >= 1 and getattr(vis, name) % tp:
            errors.append(_not_divisible(f"{v}.{name}", getattr(vis, name),
                                         "parallel.tensor_parallel", tp))
    token = config.model.image_token_id
    if token is not None and not 0 <= token < config.model.decoder.vocab_size:
        errors.append(f"model.image_token_id ({token}) must lie in [0, model.decoder.vocab_size "
                      f"({config.model.decoder.vocab_size}))")


def _check_parallel(config: Config, errors: List[str]) -> bool:
    """True when the sizes the other rules divide by (TP, PP, EP, VPP) are usable."""
    par = config.parallel
    ok = _at_least(errors, "parallel", par, ("tensor_parallel", "pipeline_parallel",
                                             "expert_parallel", "virtual_pipeline"))
    if ok and par.pipeline_parallel < 2 and (par.virtual_pipeline or 1) > 1:
        errors.append(f"parallel.virtual_pipeline ({par.virtual_pipeline}) needs "
                      f"parallel.pipeline_parallel > 1 (is {par.pipeline_parallel})")
    if par.sequence_parallel and par.tensor_parallel == 1:
        errors.append("parallel.sequence_parallel needs parallel.tensor_parallel > 1")
    if par.expert_tensor_parallel != 1:
        errors.append(f"parallel.expert_tensor_parallel ({par.expert_tensor_parallel}) must be 1: "
                      "the MoE layer keeps whole experts on each rank")
    split = par.sequence_parallel or config.model.decoder.moe.enabled
    if ok and par.tensor_parallel > 1 and split and config.data.seq_length % par.tensor_parallel:
        why = ("sequence parallelism splits" if par.sequence_parallel
               else "the MoE layers split")
        errors.append(f"data.seq_length ({config.data.seq_length}) must be divisible by "
                      f"parallel.tensor_parallel ({par.tensor_parallel}): {why} the sequence "
                      "over the tensor-parallel ranks")
    return ok


def _check_train(config: Config, errors: List[str]) -> None:
    tr = config.train
    t = "train"
    # log_interval 0 divides by zero at the first step (step % log_interval)
    _at_least(errors, t, tr, ("steps", "log_interval"))
    if _at_least(errors, t, tr, ("micro_batch_size", "global_batch_size")) and (
            tr.global_batch_size % tr.micro_batch_size):
        errors.append(_not_divisible("train.global_batch_size", tr.global_batch_size,
                                     "train.micro_batch_size", tr.micro_batch_size))
    _at_least(errors, t, tr, ("warmup_steps",), 0, " (0: no warmup)")
    _at_least(errors, t, tr, ("save_interval",), 0, " (0: final only)")
    if tr.lr is not None and not tr.lr > 0:
        errors.append(f"train.lr ({tr.lr}) must be > 0, or null for MM1's law")
    if not 0.0 <= tr.min_lr_ratio <= 1.0:
        errors.append(f"train.min_lr_ratio ({tr.min_lr_ratio}) must be within [0, 1]")
    if tr.weight_decay is not None and not tr.weight_decay >= 0:
        errors.append(f"train.weight_decay ({tr.weight_decay}) must be >= 0, or null for "
                      "0.1 x the peak lr")
    # beta = 1 keeps a moment at its zero start, and Adam's bias correction 1 - beta^t is 0
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(tr, name) < 1.0:
            errors.append(f"train.{name} ({getattr(tr, name)}) must be within [0, 1)")
    # eps 0 divides 0 by 0 for a parameter whose gradient has always been 0 (the padded vocab
    # rows of the embedding: padding ids never occur in data), and Adam writes NaN there
    _positive(errors, t, tr, ("adam_eps",))
    if tr.peak_tflops is not None and not tr.peak_tflops > 0:
        errors.append(f"train.peak_tflops ({tr.peak_tflops}) must be > 0, or null")
    if not tr.grad_clip >= 0:
        errors.append(f"train.grad_clip ({tr.grad_clip}) must be >= 0 (0 disables)")
    _check_recompute(config, errors)


def _check_recompute(config: Config, errors: List[str]) -> None:
    """Full recompute reruns groups of ``recompute_num_layers`` layers; Megatron's uniform
    method steps past a stage's last layer when the group does not divide it."""
    tr, dec, par = config.train, config.model.decoder, config.parallel
    if not _at_least(errors, "train", tr, ("recompute_num_layers",)) or tr.recompute != "full":
        return
    chunks = par.pipeline_parallel * (par.virtual_pipeline or 1)
    if dec.num_layers < 1 or chunks < 1 or dec.num_layers % chunks:
        return  # reported by the decoder and parallel rules
    per_chunk = dec.num_layers // chunks
    if per_chunk % tr.recompute_num_layers:
        errors.append(f"train.recompute_num_layers ({tr.recompute_num_layers}) does not divide "
                      f"the {per_chunk} decoder layers of each pipeline stage "
                      f"(model.decoder.num_layers ({dec.num_layers}) / {chunks} stages) under "
                      "train.recompute=full")


def _check_data(config: Config, errors: List[str]) -> None:
    data = config.data
    weights = data.weights
    if len(weights) != 3 or any(not w >= 0 for w in weights) or not sum(weights) > 0:
        errors.append(f"data.weights ({data.weights}) must be 3 non-negative weights "
                      "(interleaved, captions, text) with a positive sum")
    _at_least(errors, "data", data, ("pack_window", "max_images_per_sequence"))
    _at_least(errors, "data", data, ("seq_length",), 2)
    if data.source == "mm1_mixture" and config.model.image_token_id is None:
        errors.append("data.source (mm1_mixture) feeds images: set model.image_token_id to the "
                      "tokenizer's <image> id")


def validate(config: Config) -> Config:
    """Check every rule that does not depend on the world size; raise one ConfigError listing
    all failures."""
    errors: List[str] = []
    parallel_ok = _check_parallel(config, errors)
    _check_decoder(config, errors, parallel_ok)
    _check_moe(config, errors, parallel_ok)
    _check_vision(config, errors)
    _check_train(config, errors)
    _check_data(config, errors)
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
