"""The contract between the data pipeline and MM1Model: one packed micro-batch.

Shapes: B sequences, S tokens per sequence, I images in the micro-batch (all sequences, in
order of appearance: sequence 0's images first), P = image_size, V image tokens per image
(the connector's ``num_tokens``, 144 for MM1).

Each image occupies a run of V consecutive ``image_token_id`` placeholders in ``tokens``; the
model replaces exactly those embedding rows with the image's V connector outputs, in order.
A placeholder count that is not V x (images of that sequence) is an error, never a shift.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict

import torch


@dataclass
class PackedBatch:
    tokens: torch.Tensor  # [B, S] int64; image placeholders hold image_token_id
    labels: torch.Tensor  # [B, S] int64; the next token (any id where loss_mask is 0)
    loss_mask: torch.Tensor  # [B, S] float32; 1 on text tokens whose next token is text
    position_ids: torch.Tensor  # [B, S] int64; restart at 0 at every packed document
    doc_ids: torch.Tensor  # [B, S] int32; packed document index per token, -1 on padding
    images: torch.Tensor  # [I, 3, P, P] float32, CLIP-normalised; I may be 0
    images_per_sequence: torch.Tensor  # [B] int64; sums to I

    @property
    def routing_mask(self) -> torch.Tensor:
        """[B, S] bool: tokens that count in MoE routing statistics (real text tokens)."""
        return self.loss_mask > 0

    def to(self, device: torch.device) -> "PackedBatch":
        return PackedBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=True)
                              for f in fields(self)})

    def as_dict(self) -> Dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def validate(self, image_token_id: int, tokens_per_image: int) -> None:
        """Raise ValueError naming the sequence when placeholders and images disagree."""
        B, S = self.tokens.shape
        for name in ("labels", "loss_mask", "position_ids", "doc_ids"):
            if tuple(getattr(self, name).shape) != (B, S):
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}, "
                                 f"tokens has {(B, S)}")
        if int(self.images_per_sequence.sum()) != self.images.shape[0]:
            raise ValueError(f"images_per_sequence sums to {int(self.images_per_sequence.sum())}"
                             f" but {self.images.shape[0]} images are attached")
        counts = (self.tokens == image_token_id).sum(1)
        for b in range(B):
            expected = int(self.images_per_sequence[b]) * tokens_per_image
            if int(counts[b]) != expected:
                raise ValueError(
                    f"sequence {b}: {int(counts[b])} image placeholder tokens, expected "
                    f"{expected} ({int(self.images_per_sequence[b])} images x "
                    f"{tokens_per_image} tokens)")
