"""The trainer's view of the data: per-step micro-batches as model inputs, and a resumable state.

Packed MM1 sequences carry several documents each; attention must not cross them. The
micro-batch's B rows are laid end to end as one sequence of B*S tokens, and the document
boundaries (rows are boundaries too) go to the attention kernel as ``cu_seqlens`` in Megatron's
``PackedSeqParams``. RoPE is relative, so positions running on across documents change nothing
inside the document mask. Schedules then see micro-batches of 1 x (B*S) tokens.
"""

from __future__ import annotations

from typing import Dict, Iterator

import torch

from ..config import Config, ConfigError
from .. import data as data_lib


def document_boundaries(doc_ids_BS: torch.Tensor) -> torch.Tensor:
    """cu_seqlens (int32 [n+1]) of the B rows laid end to end: a new segment wherever the
    document changes, at every row start, and for each padding run (doc id -1)."""
    B, S = doc_ids_BS.shape
    row = torch.arange(B, device=doc_ids_BS.device).view(B, 1)
    span = int(doc_ids_BS.max().item()) + 2 if doc_ids_BS.numel() else 2
    unique = torch.where(doc_ids_BS >= 0, doc_ids_BS + row * span, -1 - row).reshape(-1)
    starts = torch.ones_like(unique, dtype=torch.bool)
    starts[1:] = unique[1:] != unique[:-1]
    cu = torch.nonzero(starts).reshape(-1)
    end = torch.tensor([unique.numel()], device=cu.device)
    return torch.cat([cu, end]).to(torch.int32)


def to_model_batch(batch, image_token_id: int) -> Dict[str, torch.Tensor]:
    """A PackedBatch [B, S] as the model's inputs [1, B*S], with document boundaries."""
    B, S = batch.tokens.shape
    flat = {name: getattr(batch, name).reshape(1, B * S)
            for name in ("tokens", "labels", "loss_mask", "position_ids")}
    # Routing statistics count real text tokens: the loss mask also keeps the last image
    # placeholder of each image (it predicts the caption's first word).
    flat["routing_mask"] = (flat["loss_mask"] > 0) & (flat["tokens"] != image_token_id)
    flat["images"] = batch.images
    flat["images_per_sequence"] = batch.images_per_sequence.sum().reshape(1)
    flat["cu_seqlens"] = document_boundaries(batch.doc_ids)
    return flat


class MixtureData:
    """MM1's mixture through ``MM1DataLoader``, for one data-parallel rank."""

    def __init__(self, config: Config, dp_rank: int, dp_size: int):
        tr = config.train
        spec = data_lib.data_spec_from_config(config)
        self.loader = data_lib.MM1DataLoader(spec, dp_rank, dp_size, tr.micro_batch_size,
                                             tr.global_batch_size)
        self.image_token_id = self.loader.tokenizer.image_token_id
        if config.model.image_token_id != self.image_token_id:
            raise ConfigError(
                f"model.image_token_id ({config.model.image_token_id}) is not the tokenizer's "
                f"<image> id ({self.image_token_id}, {self.loader.tokenizer.path})")
        self.sequence_length = tr.micro_batch_size * config.data.seq_length  # rows end to end
        self.blank_images = config.data.blank_images

    @property
    def step(self) -> int:
        return self.loader.cursor

    def next_step(self) -> Iterator[Dict[str, torch.Tensor]]:
        for batch in self.loader.next_step():
            if self.blank_images:
                batch.images = torch.zeros_like(batch.images)
            yield to_model_batch(batch, self.image_token_id)

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])


class SyntheticData:
    """The generated text stream: stateless but for the step counter."""

    def __init__(self, config: Config, dp_rank: int, dp_size: int):
        dec, tr = config.model.decoder, config.train
        self.batches = data_lib.SyntheticTextBatches(
            dec.vocab_size, config.data.seq_length, config.data.seed, tr.global_batch_size,
            tr.micro_batch_size, dp_rank, dp_size)
        self.sequence_length = config.data.seq_length

    def next_step(self) -> Iterator[Dict[str, torch.Tensor]]:
        yield from self.batches.next_step()

    def state_dict(self) -> dict:
        return {"step": self.batches.step}

    def load_state_dict(self, state: dict) -> None:
        self.batches.step = int(state["step"])


def build_data(config: Config, dp_rank: int, dp_size: int):
    if config.data.source == "mm1_mixture":
        return MixtureData(config, dp_rank, dp_size)
    return SyntheticData(config, dp_rank, dp_size)
