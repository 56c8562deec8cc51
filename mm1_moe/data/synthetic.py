"""A generated, learnable text stream that needs no files (``data.source: synthetic_text``).

Token sequences follow a fixed sparse Markov chain: each token has ``branching`` possible
successors with fixed probabilities, drawn once from ``data.seed``. A model that learns the
chain reaches the chain's entropy (printed by ``entropy_floor``, about 1.35 nats for 4 successors)
from ln(vocab) at initialisation, so a falling loss is visible within a few dozen steps.

Sample ``i`` is generated from a generator seeded by ``(seed, i)`` alone, so every data-parallel
layout sees the same global batch, split without overlap, and a resumed run regenerates exactly
the samples it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class MarkovChain:
    successors: torch.Tensor  # [V, B] successor token ids
    probs: torch.Tensor  # [V, B] their probabilities

    @classmethod
    def build(cls, vocab_size: int, seed: int, branching: int = 4) -> "MarkovChain":
        g = torch.Generator().manual_seed(seed)
        successors = torch.randint(0, vocab_size, (vocab_size, branching), generator=g)
        weights = torch.rand(vocab_size, branching, generator=g) + 0.5
        return cls(successors, weights / weights.sum(-1, keepdim=True))

    def entropy_floor(self) -> float:
        """Mean next-token entropy in nats (uniform over source tokens): the best loss."""
        return float(-(self.probs * self.probs.log()).sum(-1).mean())

    def sample(self, length: int, generator: torch.Generator) -> torch.Tensor:
        vocab = self.successors.shape[0]
        tokens = torch.empty(length, dtype=torch.long)
        tokens[0] = torch.randint(0, vocab, (1,), generator=generator)
        uniform = torch.rand(length, generator=generator)
        cumulative = self.probs.cumsum(-1)
        last = self.successors.shape[1] - 1
        for i in range(1, length):  # inverse-CDF draw of the successor of the previous token
            prev = int(tokens[i - 1])
            pick = min(int(torch.searchsorted(cumulative[prev], uniform[i])), last)
            tokens[i] = self.successors[prev, pick]
        return tokens


class SyntheticTextBatches:
    """Micro-batches of ``{"tokens", "labels", "loss_mask", "position_ids"}`` for one
    data-parallel rank: step ``s`` covers global samples ``[s * G, (s + 1) * G)``, of which this
    rank takes a contiguous ``G / dp`` slice, cut into micro-batches of ``micro_batch_size``."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int, global_batch_size: int,
                 micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, start_step: int = 0):
        self.chain = MarkovChain.build(vocab_size, seed)
        self.seq_length, self.seed = seq_length, seed
        self.global_batch, self.micro_batch = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.step = start_step

    @property
    def num_microbatches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp_size)

    def sample(self, index: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return self.chain.sample(self.seq_length + 1, generator)

    def next_step(self) -> Iterator[dict]:
        """The micro-batches of the next optimizer step on this rank."""
        per_rank = self.global_batch // self.dp_size
        first = self.step * self.global_batch + self.dp_rank * per_rank
        self.step += 1
        for m in range(self.num_microbatches):
            start = first + m * self.micro_batch
            seqs = torch.stack([self.sample(i) for i in range(start, start + self.micro_batch)])
            yield {
                "tokens": seqs[:, :-1].contiguous(),
                "labels": seqs[:, 1:].contiguous(),
                "loss_mask": torch.ones(self.micro_batch, self.seq_length),
                "position_ids": torch.arange(self.seq_length).expand(self.micro_batch, -1),
            }
