"""Hugging Face ``MixtralForCausalLM`` <-> our Megatron MoE decoder.

Embeddings, norms and attention map exactly as in :mod:`.llama` (same helpers). The FFN of every
layer is an MoE; in the installed transformers (5.x) its experts are fused 3-D tensors
(``MixtralExperts``: ``gate_up_proj`` [E, 2F, D] with rows [gate; up], ``down_proj`` [E, D, F]).
Name map (HF -> ours, per layer i; E experts, D width, F expert FFN width):

  model.layers.i.mlp.gate.weight              [E, D]      -> decoder.layers.i.mlp.router.weight   [E, D]
  model.layers.i.mlp.experts.gate_up_proj     [E, 2F, D]  -> decoder.layers.i.mlp.experts.w1      [E, D, 2F]
      transposed per expert; [gate; up] rows become [gate | up] columns (same order)
  model.layers.i.mlp.experts.down_proj        [E, D, F]   -> decoder.layers.i.mlp.experts.w2      [E, F, D]

Semantics. Mixtral's router takes softmax over all E logits, the top-K, and renormalises the K
probabilities: exactly our ``router_order: topk_softmax`` (softmax over the K selected logits),
and equally ``softmax_topk`` with ``normalize_topk: true``. Plain ``softmax_topk`` (weights not
renormalised), dense layers (``layer_freq`` other than every layer) and a capacity limit
(Mixtral is dropless) cannot be expressed and are refused. Training-only terms differ: Mixtral
has no router z-loss (``z_loss_coeff`` is not exported), and its load-balancing loss pools all
layers' routing and counts K slots per token, so ``router_aux_loss_coef`` takes our
``aux_loss_coeff`` value but the two losses are normalised differently.

An expert bias (``balance: bias|both``) has no Mixtral tensor: export refuses a non-zero one.

Every tensor is accounted for: a missing, unexpected or mis-shaped one raises ``InteropError``
naming it. Loading goes through Megatron's sharded state dict, so any TP/EP/PP layout loads the
same checkpoint.
"""

from __future__ import annotations

from typing import Dict, Iterable, Mapping

import torch

from ..config import Config
from .llama import (
    InteropError,
    _check_names,
    _check_shape,
    _expected_shared_names,
    _export_to_hf,
    _load_full_,
    _shared_from_hf,
)

__all__ = ["mixtral_config", "megatron_from_mixtral", "mixtral_from_megatron", "load_mixtral_"]


def _require_mixtral_expressible(config: Config) -> None:
    """Refuse a decoder that no ``MixtralForCausalLM`` computes; the message names the field."""
    dec = config.model.decoder
    moe, p = dec.moe, "model.decoder.moe"
    if not moe.enabled:
        raise InteropError(f"Mixtral is a mixture of experts in every layer; {p}.num_experts is 0 "
                           "(a dense decoder converts with the Llama functions)")
    dense = [i for i in range(dec.num_layers) if not dec.is_moe_layer(i)]
    if dense:
        raise InteropError(f"Mixtral has an MoE FFN in every layer, but {p}.layer_freq "
                           f"({moe.layer_freq}) makes layers {dense} dense; set it to 1")
    if moe.router_order == "softmax_topk" and not moe.normalize_topk:
        raise InteropError(f"Mixtral renormalises the top-k routing weights to sum to 1; "
                           f"{p}.router_order (softmax_topk) without {p}.normalize_topk does not: "
                           "use router_order topk_softmax")
    if moe.capacity_factor is not None:
        raise InteropError(f"Mixtral routes without dropping tokens; {p}.capacity_factor "
                           f"({moe.capacity_factor}) must be null")


def _expert_ffn(config: Config) -> int:
    dec = config.model.decoder
    return dec.moe.expert_ffn_hidden_size or dec.ffn_hidden_size


def mixtral_config(config: Config):
    """The ``transformers.MixtralConfig`` with the same architecture as our MoE decoder."""
    from transformers import MixtralConfig

    _require_mixtral_expressible(config)
    dec = config.model.decoder
    moe = dec.moe
    return MixtralConfig(
        vocab_size=dec.vocab_size,
        hidden_size=dec.hidden_size,
        intermediate_size=_expert_ffn(config),
        num_hidden_layers=dec.num_layers,
        num_attention_heads=dec.num_attention_heads,
        num_key_value_heads=dec.kv_heads,
        head_dim=dec.head_dim,
        max_position_embeddings=dec.max_position_embeddings,
        rms_norm_eps=dec.norm_eps,
        rope_theta=dec.rope_theta,
        tie_word_embeddings=False,
        hidden_act="silu",
        sliding_window=None,
        attention_dropout=0.0,
        num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        router_aux_loss_coef=moe.aux_loss_coeff,
        router_jitter_noise=moe.router_jitter,
    )


def _hf_moe_names(i: int):
    p = f"model.layers.{i}.mlp"
    return [f"{p}.gate.weight", f"{p}.experts.gate_up_proj", f"{p}.experts.down_proj"]


def megatron_from_mixtral(hf: Mapping[str, torch.Tensor], config: Config) -> Dict[str, torch.Tensor]:
    """A full (unsharded) state dict in our naming from a Mixtral state dict (the fused-expert
    layout of ``MixtralForCausalLM.state_dict()``). Strict."""
    _require_mixtral_expressible(config)
    dec = config.model.decoder
    if any(".block_sparse_moe." in k for k in hf):
        raise InteropError("the Mixtral checkpoint has per-expert tensors (block_sparse_moe.experts.j.w1/w2/w3, "
                           "the original Hub layout); load it with transformers' "
                           "MixtralForCausalLM.from_pretrained and convert model.state_dict(), "
                           "which holds the fused mlp.experts.gate_up_proj / down_proj")
    expected = _expected_shared_names(config)
    for i in range(dec.num_layers):
        expected.update(_hf_moe_names(i))
    _check_names(hf, expected, "Mixtral")
    out = _shared_from_hf(hf, config)
    E, D, F = dec.moe.num_experts, dec.hidden_size, _expert_ffn(config)
    for i in range(dec.num_layers):
        router, gate_up, down = _hf_moe_names(i)
        o = f"decoder.layers.{i}.mlp"
        out[f"{o}.router.weight"] = _check_shape(router, hf[router], (E, D))
        out[f"{o}.experts.w1"] = _check_shape(gate_up, hf[gate_up], (E, 2 * F, D)).transpose(1, 2)
        out[f"{o}.experts.w2"] = _check_shape(down, hf[down], (E, D, F)).transpose(1, 2)
    return out


def mixtral_from_megatron(state: Mapping[str, torch.Tensor], config: Config) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`megatron_from_mixtral` (vocab padding dropped). Strict: every tensor
    must be present, and the MoE tensors must have their global [E, ...] shapes."""
    _require_mixtral_expressible(config)
    _refuse_expert_bias(state)
    dec = config.model.decoder
    E, D, F = dec.moe.num_experts, dec.hidden_size, _expert_ffn(config)

    def layer_ffn(i: int) -> Dict[str, torch.Tensor]:
        router, gate_up, down = _hf_moe_names(i)
        o = f"decoder.layers.{i}.mlp"
        gate = _check_shape(f"{o}.router.weight", state[f"{o}.router.weight"], (E, D))
        w1 = _check_shape(f"{o}.experts.w1", state[f"{o}.experts.w1"], (E, D, 2 * F))
        w2 = _check_shape(f"{o}.experts.w2", state[f"{o}.experts.w2"], (E, F, D))
        return {router: gate, gate_up: w1.transpose(1, 2), down: w2.transpose(1, 2)}

    return _export_to_hf(state, config, layer_ffn)


def _refuse_expert_bias(state: Mapping[str, torch.Tensor]) -> None:
    """An expert bias (``balance: bias|both``) changes which experts a token goes to, and
    Mixtral's format has no tensor for it: a reader would route differently. Refused unless
    every bias is zero (nothing is lost then)."""
    biased = [name for name, t in state.items()
              if name.endswith("router.expert_bias") and bool(t.detach().abs().max() > 0)]
    if biased:
        raise InteropError(
            f"{biased[0]} (and {len(biased) - 1} more) is an expert bias from "
            "model.decoder.moe.balance: bias|both; it steers the top-k choice and Mixtral's "
            "format has no tensor for it (MixtralForCausalLM would route differently). Export to "
            "a format with a routing bias (DeepSeek-V3's e_score_correction_bias), or train "
            "with balance: aux_loss")


def load_mixtral_(chunks: Iterable[torch.nn.Module], hf: Mapping[str, torch.Tensor], config: Config) -> int:
    """Load a Mixtral state dict into this rank's decoder chunks (any TP/EP/PP layout). Every
    parameter of the chunks must be found; returns the number of tensors set."""
    return _load_full_(chunks, megatron_from_mixtral(hf, config), "Mixtral")
