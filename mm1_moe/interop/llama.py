"""Hugging Face ``LlamaForCausalLM`` <-> our Megatron decoder.

Name map (HF -> ours, per layer i; D width, hd head dim, g KV groups, q = heads / g):
  model.embed_tokens.weight                   -> embedding.word_embeddings.weight (vocab padded)
  model.layers.i.input_layernorm.weight       -> decoder.layers.i.input_layernorm.weight
  model.layers.i.self_attn.{q,k,v}_proj       -> decoder.layers.i.self_attention.linear_qkv.weight
      Megatron interleaves per KV group: rows [q heads of group 0, k0, v0, q heads of group 1, ...]
      so a tensor-parallel split keeps whole groups: [(g * (q + 2)) * hd, D].
  model.layers.i.self_attn.o_proj             -> decoder.layers.i.self_attention.linear_proj.weight
  model.layers.i.post_attention_layernorm     -> decoder.layers.i.pre_mlp_layernorm.weight
  model.layers.i.mlp.{gate,up}_proj           -> decoder.layers.i.mlp.linear_fc1.weight ([gate; up])
  model.layers.i.mlp.down_proj                -> decoder.layers.i.mlp.linear_fc2.weight
  model.norm.weight                           -> decoder.final_layernorm.weight
  lm_head.weight                              -> output_layer.weight (vocab padded)

Every tensor is accounted for: a missing, unexpected or mis-shaped one raises ``InteropError``
naming it; nothing is left at its random init. Loading goes through Megatron's sharded state
dict, so any TP/PP layout loads the same checkpoint. A folder's files are read by
``hf_files.py`` and checked by :func:`llama_tensors_from_files` first, which also names the file
of each bad tensor and reports all of them at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, Iterable, List, Mapping, Set, Tuple

import torch

from ..config import Config
from ..models.init import fill_from_global_

if TYPE_CHECKING:
    from .hf_files import HFWeights

# Older transformers saved each layer's rotary_emb.inv_freq as a persistent buffer. It is
# 1 / rope_theta^(2i / head_dim), which both models recompute from the config: no weight, ignored.
ROTARY_BUFFER = "rotary_emb.inv_freq"


class InteropError(ValueError):
    """A checkpoint that does not match the model; the message names the tensor."""


def llama_config(config: Config):
    """The ``transformers.LlamaConfig`` with the same architecture as our decoder."""
    from transformers import LlamaConfig

    dec = config.model.decoder
    return LlamaConfig(
        vocab_size=dec.vocab_size,
        hidden_size=dec.hidden_size,
        intermediate_size=dec.ffn_hidden_size,
        num_hidden_layers=dec.num_layers,
        num_attention_heads=dec.num_attention_heads,
        num_key_value_heads=dec.kv_heads,
        head_dim=dec.head_dim,
        max_position_embeddings=dec.max_position_embeddings,
        rms_norm_eps=dec.norm_eps,
        rope_theta=dec.rope_theta,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        hidden_act="silu",
    )


def _check_shape(name: str, tensor: torch.Tensor, shape) -> torch.Tensor:
    if tuple(tensor.shape) != tuple(shape):
        raise InteropError(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    return tensor


def _pad_vocab(name: str, tensor: torch.Tensor, config: Config) -> torch.Tensor:
    """Pad rows to the padded vocab with zeros (padding ids never occur in data)."""
    dec = config.model.decoder
    _check_shape(name, tensor, (dec.vocab_size, dec.hidden_size))
    pad = dec.padded_vocab_size - dec.vocab_size
    return torch.cat([tensor, tensor.new_zeros(pad, dec.hidden_size)]) if pad else tensor


def _fuse_qkv(prefix: str, hf: Mapping[str, torch.Tensor], config: Config) -> torch.Tensor:
    dec = config.model.decoder
    hd, g, D = dec.head_dim, dec.kv_heads, dec.hidden_size
    q_per_g = dec.num_attention_heads // g
    q = _check_shape(f"{prefix}.q_proj.weight", hf[f"{prefix}.q_proj.weight"], (g * q_per_g * hd, D))
    k = _check_shape(f"{prefix}.k_proj.weight", hf[f"{prefix}.k_proj.weight"], (g * hd, D))
    v = _check_shape(f"{prefix}.v_proj.weight", hf[f"{prefix}.v_proj.weight"], (g * hd, D))
    groups = [q.view(g, q_per_g * hd, D), k.view(g, hd, D), v.view(g, hd, D)]
    return torch.cat(groups, dim=1).reshape(-1, D)


def _split_qkv(qkv: torch.Tensor, config: Config):
    dec = config.model.decoder
    hd, g, D = dec.head_dim, dec.kv_heads, dec.hidden_size
    q_per_g = dec.num_attention_heads // g
    grouped = qkv.view(g, (q_per_g + 2) * hd, D)
    q, k, v = torch.split(grouped, [q_per_g * hd, hd, hd], dim=1)
    return q.reshape(-1, D), k.reshape(-1, D), v.reshape(-1, D)


def _hf_shared_layer_names(i: int) -> List[str]:
    """Layer ``i``'s norms and attention: the tensors every Llama-style family shares."""
    p = f"model.layers.{i}"
    return [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight",
            *(f"{p}.self_attn.{n}_proj.weight" for n in "qkvo")]


def _check_names(hf: Mapping[str, torch.Tensor], expected: Set[str], family: str) -> None:
    """Raise ``InteropError`` naming unexpected or missing tensors (rotary buffers ignored)."""
    present = {k for k in hf if not k.endswith(ROTARY_BUFFER)}
    if present - expected:
        raise InteropError(f"unexpected tensors in the {family} checkpoint: {sorted(present - expected)[:8]}")
    if expected - present:
        raise InteropError(f"tensors missing from the {family} checkpoint: {sorted(expected - present)[:8]}")


def llama_shapes(config: Config) -> Dict[str, Tuple[int, ...]]:
    """Name -> shape of every tensor of the Llama checkpoint of our decoder (V the real vocabulary,
    not the padded one; q = heads * hd, kv = KV heads * hd)."""
    dec = config.model.decoder
    D, F, V = dec.hidden_size, dec.ffn_hidden_size, dec.vocab_size
    q, kv = dec.num_attention_heads * dec.head_dim, dec.kv_heads * dec.head_dim
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,),
              "lm_head.weight": (V, D)}
    for i in range(dec.num_layers):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (D,), f"{p}.post_attention_layernorm.weight": (D,),
            f"{p}.self_attn.q_proj.weight": (q, D), f"{p}.self_attn.k_proj.weight": (kv, D),
            f"{p}.self_attn.v_proj.weight": (kv, D), f"{p}.self_attn.o_proj.weight": (D, q),
            f"{p}.mlp.gate_proj.weight": (F, D), f"{p}.mlp.up_proj.weight": (F, D),
            f"{p}.mlp.down_proj.weight": (D, F),
        })
    return shapes


def llama_tensors_from_files(weights: "HFWeights", config: Config,
                             tied: bool) -> Mapping[str, torch.Tensor]:
    """A Llama folder's tensors (``hf_files.read_hf_weights``) checked against
    :func:`llama_shapes` from the files' headers (no tensor data is read): every missing,
    unexpected, mis-shaped or non-float tensor, in one InteropError that names each tensor and
    its file. ``tied`` is config.json's tie_word_embeddings: lm_head is then the embedding
    (absent from the files, or equal to it). The result reads each tensor when it is used."""
    from .hf_files import LazyTensors, dtype_of, shape_of

    source = weights.tensors
    names = {k for k in source if not k.endswith(ROTARY_BUFFER)}
    problems = _tie_head_(names, weights, tied)
    expected = llama_shapes(config)
    searched = weights.searched()
    for name in sorted(names - set(expected)):
        problems.append(f"unexpected tensor {name} in {weights.file_of(name)}")
    for name in sorted(set(expected) - names):
        hint = " (config.json: tie_word_embeddings false)" if name == "lm_head.weight" else ""
        problems.append(f"missing tensor {name}: not in {searched}{hint}")
    for name in sorted(set(expected) & names):
        real = "model.embed_tokens.weight" if name not in source else name  # a tied head
        shape, where = shape_of(source, real), f"{name} in {weights.file_of(real)}"
        if shape != expected[name]:
            problems.append(f"{where}: shape {shape}, expected {expected[name]}")
        elif not dtype_of(source, real).is_floating_point:
            problems.append(f"{where}: dtype {dtype_of(source, real)}, expected a "
                            "floating-point tensor")
    if problems:
        more = [f"... and {len(problems) - 16} more"] if len(problems) > 16 else []
        raise InteropError(f"{weights.folder} does not hold the Llama model that the MoE config's "
                           "model.decoder describes (shapes from its sizes):\n  "
                           + "\n  ".join(problems[:16] + more))
    head, embed = "lm_head.weight", "model.embed_tokens.weight"
    if isinstance(source, LazyTensors):
        if head not in source:
            source.alias(head, embed)
        return source
    tensors = {k: source[k] for k in names}
    tensors.setdefault(head, tensors.get(embed))
    return tensors


def _tie_head_(names: Set[str], weights: "HFWeights", tied: bool) -> List[str]:
    """With tied embeddings, lm_head is the embedding (``names`` gains it); a stored lm_head
    must equal it (the one check here that reads data: two tensors)."""
    head, embed = "lm_head.weight", "model.embed_tokens.weight"
    if not tied or embed not in names:
        return []
    if head not in names:
        names.add(head)
        return []
    stored, embedding = weights.tensors[head], weights.tensors[embed]
    if stored.shape == embedding.shape and not torch.equal(stored, embedding):
        return [f"{head} in {weights.file_of(head)} differs from {embed} in "
                f"{weights.file_of(embed)}, but config.json ties them (tie_word_embeddings)"]
    return []


def _expected_shared_names(config: Config) -> Set[str]:
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(config.model.decoder.num_layers):
        expected.update(_hf_shared_layer_names(i))
    return expected


def _shared_thunks(hf: Mapping[str, torch.Tensor],
                   config: Config) -> Dict[str, Callable[[], torch.Tensor]]:
    """Embeddings, output layer, final norm and every layer's norms and attention, HF -> ours,
    each as a function that reads and converts its tensor when called (``LazyConverted``)."""
    dec = config.model.decoder
    D, q = dec.hidden_size, dec.num_attention_heads * dec.head_dim

    def checked(name: str, shape) -> Callable[[], torch.Tensor]:
        return lambda: _check_shape(name, hf[name], shape)

    out: Dict[str, Callable[[], torch.Tensor]] = {
        "embedding.word_embeddings.weight":
            lambda: _pad_vocab("model.embed_tokens.weight", hf["model.embed_tokens.weight"], config),
        "output_layer.weight": lambda: _pad_vocab("lm_head.weight", hf["lm_head.weight"], config),
        "decoder.final_layernorm.weight": checked("model.norm.weight", (D,)),
    }
    for i in range(dec.num_layers):
        p, o = f"model.layers.{i}", f"decoder.layers.{i}"
        out[f"{o}.input_layernorm.weight"] = checked(f"{p}.input_layernorm.weight", (D,))
        out[f"{o}.pre_mlp_layernorm.weight"] = checked(f"{p}.post_attention_layernorm.weight", (D,))
        out[f"{o}.self_attention.linear_qkv.weight"] = (
            lambda p=p: _fuse_qkv(f"{p}.self_attn", hf, config))
        out[f"{o}.self_attention.linear_proj.weight"] = checked(f"{p}.self_attn.o_proj.weight",
                                                                (D, q))
    return out


def _shared_from_hf(hf: Mapping[str, torch.Tensor], config: Config) -> Dict[str, torch.Tensor]:
    """The shared tensors, converted now. Names must already have been checked
    (:func:`_check_names`); shapes are checked here."""
    return {name: convert() for name, convert in _shared_thunks(hf, config).items()}


class LazyConverted(Mapping):
    """Name -> tensor, each converted from the source when looked up and not kept: loading a
    model holds one converted tensor at a time (its shard is copied out, the rest freed)."""

    def __init__(self, thunks: Mapping[str, Callable[[], torch.Tensor]]) -> None:
        self._thunks = dict(thunks)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._thunks[name]()

    def __iter__(self):
        return iter(self._thunks)

    def __len__(self) -> int:
        return len(self._thunks)


def _shared_to_hf(state: Mapping[str, torch.Tensor], config: Config) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`_shared_from_hf` (vocab padding dropped); raises ``KeyError``."""
    dec = config.model.decoder
    V = dec.vocab_size
    out = {
        "model.embed_tokens.weight": state["embedding.word_embeddings.weight"][:V],
        "lm_head.weight": state["output_layer.weight"][:V],
        "model.norm.weight": state["decoder.final_layernorm.weight"],
    }
    for i in range(dec.num_layers):
        p, o = f"model.layers.{i}", f"decoder.layers.{i}"
        q, k, v = _split_qkv(state[f"{o}.self_attention.linear_qkv.weight"], config)
        out.update({
            f"{p}.input_layernorm.weight": state[f"{o}.input_layernorm.weight"],
            f"{p}.post_attention_layernorm.weight": state[f"{o}.pre_mlp_layernorm.weight"],
            f"{p}.self_attn.q_proj.weight": q, f"{p}.self_attn.k_proj.weight": k,
            f"{p}.self_attn.v_proj.weight": v,
            f"{p}.self_attn.o_proj.weight": state[f"{o}.self_attention.linear_proj.weight"],
        })
    return out


def _export_to_hf(state: Mapping[str, torch.Tensor], config: Config,
                  layer_ffn: Callable[[int], Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """A Hugging Face state dict: the shared parts plus ``layer_ffn(i)``'s FFN tensors of each
    layer, as contiguous copies. A tensor missing from ``state`` is an InteropError naming it."""
    try:
        out = _shared_to_hf(state, config)
        for i in range(config.model.decoder.num_layers):
            out.update(layer_ffn(i))
    except KeyError as err:
        raise InteropError(f"tensor {err.args[0]} missing from the decoder state") from None
    return {k: t.contiguous().clone() for k, t in out.items()}


def _load_full_(chunks: Iterable[torch.nn.Module], full: Mapping[str, torch.Tensor], family: str) -> int:
    """Fill this rank's chunks from a converted full state dict; every parameter needs a source."""

    def lookup(name: str, shape) -> torch.Tensor:
        if name not in full:
            raise InteropError(f"model tensor {name} has no source in the {family} checkpoint")
        return full[name]

    return fill_from_global_(chunks, lookup)


def _llama_thunks(hf: Mapping[str, torch.Tensor],
                  config: Config) -> Dict[str, Callable[[], torch.Tensor]]:
    dec = config.model.decoder
    if dec.moe.enabled:
        raise InteropError("a Llama checkpoint is dense; model.decoder.moe.num_experts must be 0 "
                           "(upcycle it into an MoE decoder instead)")
    _check_names(hf, set(llama_shapes(config)), "Llama")
    out = _shared_thunks(hf, config)
    D, F = dec.hidden_size, dec.ffn_hidden_size
    for i in range(dec.num_layers):
        p, o = f"model.layers.{i}", f"decoder.layers.{i}"

        def fc1(p=p) -> torch.Tensor:
            gate = _check_shape(f"{p}.mlp.gate_proj.weight", hf[f"{p}.mlp.gate_proj.weight"], (F, D))
            up = _check_shape(f"{p}.mlp.up_proj.weight", hf[f"{p}.mlp.up_proj.weight"], (F, D))
            return torch.cat([gate, up])

        out[f"{o}.mlp.linear_fc1.weight"] = fc1
        out[f"{o}.mlp.linear_fc2.weight"] = (lambda p=p: _check_shape(
            f"{p}.mlp.down_proj.weight", hf[f"{p}.mlp.down_proj.weight"], (D, F)))
    return out


def megatron_from_llama(hf: Mapping[str, torch.Tensor], config: Config) -> Dict[str, torch.Tensor]:
    """A full (unsharded) state dict in our naming from a Llama state dict. Strict."""
    return {name: convert() for name, convert in _llama_thunks(hf, config).items()}


def llama_from_megatron(state: Mapping[str, torch.Tensor], config: Config) -> Dict[str, torch.Tensor]:
    """The inverse of :func:`megatron_from_llama` (vocab padding dropped). Strict."""

    def layer_ffn(i: int) -> Dict[str, torch.Tensor]:
        p, o = f"model.layers.{i}", f"decoder.layers.{i}"
        gate, up = torch.chunk(state[f"{o}.mlp.linear_fc1.weight"], 2)
        return {f"{p}.mlp.gate_proj.weight": gate, f"{p}.mlp.up_proj.weight": up,
                f"{p}.mlp.down_proj.weight": state[f"{o}.mlp.linear_fc2.weight"]}

    return _export_to_hf(state, config, layer_ffn)


def load_llama_(chunks: Iterable[torch.nn.Module], hf: Mapping[str, torch.Tensor], config: Config) -> int:
    """Load a Llama state dict into this rank's decoder chunks (any TP/PP layout). Every
    parameter of the chunks must be found; returns the number of tensors set. Each tensor is
    read and converted when this rank's chunks need it (``LazyConverted``), so a rank reads
    its own layers' tensors, one at a time."""
    return _load_full_(chunks, LazyConverted(_llama_thunks(hf, config)), "Llama")
