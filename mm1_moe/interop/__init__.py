"""Hugging Face import/export: Llama-style dense decoders, Mixtral MoE decoders, CLIP
vision towers (import only)."""

from .clip import clip_vision_config, load_clip_vision_, vit_from_clip
from .llama import InteropError, llama_config, llama_from_megatron, load_llama_, megatron_from_llama
from .mixtral import load_mixtral_, megatron_from_mixtral, mixtral_config, mixtral_from_megatron

__all__ = ["InteropError", "llama_config", "llama_from_megatron", "load_llama_", "megatron_from_llama",
           "load_mixtral_", "megatron_from_mixtral", "mixtral_config", "mixtral_from_megatron",
           "clip_vision_config", "load_clip_vision_", "vit_from_clip"]
