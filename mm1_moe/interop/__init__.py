"""Hugging Face import/export: Llama-style decoders (and, later, CLIP vision towers)."""

from .llama import InteropError, llama_config, llama_from_megatron, load_llama_, megatron_from_llama

__all__ = ["InteropError", "llama_config", "llama_from_megatron", "load_llama_", "megatron_from_llama"]
