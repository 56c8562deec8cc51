"""Greedy captioning with a trained MM1 model: the default run's closing sample.

No KV cache: each new token re-runs the whole (short) sequence, which is what a tiny model on
a CPU can afford and keeps this independent of Megatron's inference machinery. Single pipeline
stage only (the caller checks); every tensor-parallel rank runs the same forward.
"""

from __future__ import annotations

import math
import tarfile
from typing import Optional, Tuple

import torch

from .config import Config


def first_caption_pair(shard_path: str) -> Tuple[bytes, str, str]:
    """(image bytes, caption, key) of the first image-caption pair in a WebDataset shard."""
    with tarfile.open(shard_path) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        for name in sorted(members):
            key, _, ext = name.rpartition(".")
            if ext.lower() in ("jpg", "jpeg", "png") and f"{key}.txt" in members:
                image = tar.extractfile(members[name]).read()
                caption = tar.extractfile(members[f"{key}.txt"]).read().decode("utf-8").strip()
                return image, caption, key
    raise ValueError(f"{shard_path}: no image with a .txt caption")


def non_text_ids(tokenizer, vocab_size: int, device=None) -> torch.Tensor:
    """Ids a caption may not contain: ``<image>`` (a placeholder with no image behind it fails
    the next forward's placeholder count), ``<pad>``, ``<s>``, ``<unk>``, and the ids past the
    tokenizer's vocabulary that the model's (padded) vocabulary still has. ``</s>`` is allowed:
    it ends the caption."""
    ids = {tokenizer.image_token_id, tokenizer.pad_id, tokenizer.bos_id, tokenizer.unk_id}
    ids |= set(range(min(tokenizer.vocab_size, vocab_size), vocab_size))
    ids.discard(None)
    ids.discard(tokenizer.eos_id)
    return torch.tensor(sorted(i for i in ids if 0 <= i < vocab_size), dtype=torch.long,
                        device=device)


@torch.no_grad()
def greedy_caption(model: torch.nn.Module, config: Config, tokenizer, pixels_3PP: torch.Tensor,
                   max_new_tokens: int = 48, device: Optional[torch.device] = None) -> str:
    """The caption ``model`` (one MM1 chunk, unwrapped) writes for one preprocessed image."""
    device = device or pixels_3PP.device
    vocab = config.model.decoder.vocab_size
    banned = non_text_ids(tokenizer, vocab, device)
    image_run = [config.model.image_token_id] * config.model.connector.num_tokens
    tokens = list(image_run)
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            ids = torch.tensor([tokens], device=device)
            positions = torch.arange(len(tokens), device=device).unsqueeze(0)
            logits = model(ids, positions, images=pixels_3PP[None].to(device),
                           images_per_sequence=torch.tensor([1], device=device))
            next_logits = logits[0, -1, :vocab].float()
            next_logits[banned] = -math.inf
            next_id = int(next_logits.argmax())
            if next_id == tokenizer.eos_id:
                break
            tokens.append(next_id)
    finally:
        model.train(was_training)
    return tokenizer.decode(tokens[len(image_run):], skip_special=True).strip()
