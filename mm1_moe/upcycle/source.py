"""Dense sources: our checkpoints (any parallel layout) and Hugging Face Llama folders.

``resolve_source`` names what a path is without starting anything; ``dense_config`` gives the
dense model's config; ``load_source_`` fills single-process dense model chunks from the source
(``dist_checkpointing`` reshards a TP/PP/VPP checkpoint into them); ``global_state_dict`` reads
the chunks back as global tensors named as ``mm1_moe.models.init.fill_from_global_`` names them.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import torch
import yaml

from ..config import Config, ConfigError, ParallelConfig, config_from_dict, validate
from ..models.init import _sharded_tensors, layer_key, model_sharded_state_dict
from ..training.checkpoint import COMPLETE, complete_checkpoints, read_meta
from .convert import UpcycleError

HF_CONFIG = "config.json"


@dataclass(frozen=True)
class DenseSource:
    kind: str  # "mm1-moe" (our checkpoint: a step_* folder) or "huggingface" (a Llama folder)
    path: str


def resolve_source(path: str) -> DenseSource:
    """A step folder, a checkpoints root or run folder (newest complete checkpoint), or a
    Hugging Face model folder (``config.json`` + safetensors or .bin weights)."""
    if not os.path.exists(path):
        raise UpcycleError(f"dense source {path!r} does not exist")
    if os.path.isfile(os.path.join(path, COMPLETE)):
        return DenseSource("mm1-moe", path)
    if os.path.isfile(os.path.join(path, HF_CONFIG)):
        return DenseSource("huggingface", path)
    for root in (path, os.path.join(path, "checkpoints")):
        found = complete_checkpoints(root)
        if found:
            return DenseSource("mm1-moe", found[0])
    raise UpcycleError(f"dense source {path!r} is neither an mm1-moe checkpoint (a step_* folder "
                       f"with {COMPLETE}, or a folder of them) nor a Hugging Face model folder "
                       f"(with {HF_CONFIG})")


def _checkpoint_config(path: str) -> Config:
    meta = read_meta(path)
    if not meta.get("config"):
        raise UpcycleError(f"{os.path.join(path, COMPLETE)} holds no config: cannot rebuild the "
                           "dense model it was saved from")
    try:
        config = config_from_dict(yaml.safe_load(meta["config"]))
        validate(config)
    except ConfigError as err:
        raise UpcycleError(f"the config saved in {path} is not valid here: {err}") from err
    return config


def _hf_value(hf_config, name: str):
    if name == "rope_theta":  # transformers 5 keeps it under rope_parameters
        params = getattr(hf_config, "rope_parameters", None) or {}
        return params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    return getattr(hf_config, name, None)


def _check_hf_config(hf_config, config: Config, path: str) -> None:
    """The Llama config against the decoder the MoE config describes; names each mismatch."""
    from ..interop import llama_config

    if getattr(hf_config, "num_local_experts", None) or hf_config.model_type == "mixtral":
        raise UpcycleError(f"{path} is already a mixture of experts ({hf_config.model_type}, "
                           f"{getattr(hf_config, 'num_local_experts', '?')} experts)")
    if hf_config.model_type != "llama":
        raise UpcycleError(f"{path}: model_type {hf_config.model_type!r}; only Llama-style "
                           "(LlamaForCausalLM) Hugging Face models upcycle")
    ours = llama_config(config)
    names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta",
             "hidden_act", "attention_bias", "mlp_bias")
    diffs = [f"{n}: {_hf_value(hf_config, n)!r} in {path}, {_hf_value(ours, n)!r} from the MoE "
             "config's model.decoder"
             for n in names if _hf_value(hf_config, n) != _hf_value(ours, n)]
    rope_type = (_hf_value(hf_config, "rope_parameters") or {}).get("rope_type", "default")
    if rope_type != "default":
        diffs.append(f"rope_parameters.rope_type: {rope_type!r} in {path} (only 'default' RoPE)")
    if diffs:
        raise UpcycleError("the Hugging Face model does not match the MoE config's decoder:\n  "
                           + "\n  ".join(diffs))


def single_process_config(config: Config, dtype: str = "fp32") -> Config:
    """``config`` at TP = PP = EP = 1 in ``dtype``, drawing no throwaway initial weights: how
    upcycling builds every model (checkpoints reshard to and from this layout)."""
    out = copy.deepcopy(config)
    out.parallel = ParallelConfig()
    out.train.dtype = dtype
    out.model.layout_invariant_init = False
    return out


def _as_dense(config: Config) -> Config:
    dense = copy.deepcopy(config)
    dense.model.decoder.moe.num_experts = 0
    dense.model.decoder.moe.layer_freq = 1
    dense.model.decoder.moe.expert_ffn_hidden_size = None
    dense.parallel.expert_parallel = 1
    return dense


def dense_config(source: DenseSource, moe_config: Config) -> Config:
    """The dense model's config: the one saved with our checkpoint, or (Hugging Face) the MoE
    config's decoder without experts, after checking the folder's config.json against it."""
    if source.kind == "mm1-moe":
        config = _checkpoint_config(source.path)
        moe = config.model.decoder.moe
        if moe.enabled:
            raise UpcycleError(f"{source.path} is already a mixture of experts "
                               f"(model.decoder.moe.num_experts = {moe.num_experts} in its config)")
        return config
    _check_hf_config(_read_hf_config(source.path), moe_config, source.path)
    return _as_dense(moe_config)


def _read_hf_config(path: str):
    try:
        from transformers import AutoConfig
    except ImportError as err:
        raise UpcycleError(f"{path}: reading a Hugging Face folder needs transformers and "
                           "safetensors: pip install 'mm1-moe[hf]'") from err

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise UpcycleError(f"{path}: cannot read the Hugging Face config ({err})") from err


def read_hf_llama(path: str, config: Config) -> Dict[str, torch.Tensor]:
    """The Llama tensors of a Hugging Face folder, read from its weight files by our reader (not
    ``from_pretrained``, which fills a missing tensor at random and drops an extra one): a
    missing, extra or mis-shaped tensor is an InteropError naming it and its file, raised before
    anything is written. Tensors keep their stored dtype; loading copies them into fp32."""
    from ..interop.hf_files import read_hf_weights
    from ..interop.llama import llama_tensors_from_files

    tied = bool(getattr(_read_hf_config(path), "tie_word_embeddings", False))
    return llama_tensors_from_files(read_hf_weights(path), config, tied)


def load_source_(chunks: List[torch.nn.Module], source: DenseSource, config: Config,
                 hf_tensors: Optional[Dict[str, torch.Tensor]] = None) -> int:
    """Fill single-process chunks from the source (model tensors only); returns how many. A
    Hugging Face folder is read with :func:`read_hf_llama` unless its tensors are given."""
    if source.kind == "mm1-moe":
        from megatron.core import dist_checkpointing

        from ..training.safe_load import restricted_unpickling

        state = {f"model{i}": model_sharded_state_dict(c) for i, c in enumerate(chunks)}
        with restricted_unpickling(source.path):  # runs no code from the checkpoint
            loaded = dist_checkpointing.load(state, source.path)
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(loaded[f"model{i}"], strict=True)
        return sum(1 for c in chunks for _ in _sharded_tensors(c))
    from ..interop import load_llama_

    if hf_tensors is None:
        hf_tensors = read_hf_llama(source.path, config)
    return load_llama_(chunks, hf_tensors, config)


@torch.no_grad()
def global_state_dict(chunks: Iterable[torch.nn.Module]) -> Dict[str, torch.Tensor]:
    """Every sharded tensor of ``chunks`` as one global CPU tensor, under its layer-global name
    (``decoder.layers.3.mlp.linear_fc1.weight``). The chunks must hold whole tensors (one
    process, TP = PP = EP = 1); a tensor with a part missing raises."""
    out: Dict[str, torch.Tensor] = {}
    covered: Dict[str, int] = {}
    for chunk in chunks:
        for sharded in _sharded_tensors(chunk):
            n = sharded.prepend_axis_num
            name, shape = layer_key(sharded), tuple(sharded.global_shape[n:])
            full = out.setdefault(name, torch.empty(shape, dtype=sharded.data.dtype))
            index = tuple(slice(o, o + size)
                          for o, size in zip(sharded.global_offset[n:], sharded.local_shape))
            full[index] = sharded.data.detach().cpu()
            covered[name] = covered.get(name, 0) + sharded.data.numel()
    partial = [n for n, t in out.items() if covered[n] != t.numel()]
    if partial:
        raise RuntimeError(f"tensors only partly held by this process: {partial[:4]}")
    return out

