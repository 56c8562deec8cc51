"""Which source each document is drawn from: MM1's 45/45/10 mixture, deterministic by seed.

Draws come in blocks of ``BLOCK`` (1000): each block holds each source's exact quota (the
weights apportioned to 1000 by largest remainder: 450/450/100 for MM1) in an order shuffled by
(seed, block index). So the proportions are exact at every block boundary and off by a
hypergeometric wobble (a few draws) inside a block, where i.i.d. draws would be off by about
sqrt(N) (50 draws at N = 10,000, the 1-point tolerance); and draw ``n`` is a pure function of
(seed, n): the mixture's whole state is the number of draws made.
"""

from __future__ import annotations

import math
import random
from typing import List, Sequence


def apportion(weights: Sequence[float], total: int) -> List[int]:
    """Largest-remainder integer quotas of ``total`` proportional to ``weights``."""
    s = float(sum(weights))
    exact = [w / s * total for w in weights]
    quotas = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (quotas[i] - exact[i], i))
    for i in by_remainder[: total - sum(quotas)]:
        quotas[i] += 1
    return quotas


class MixtureSchedule:
    BLOCK = 1000

    def __init__(self, weights: Sequence[float], seed: int):
        self.weights = list(weights)
        self.seed = seed
        quotas = apportion(self.weights, self.BLOCK)
        self._template = [i for i, q in enumerate(quotas) for _ in range(q)]
        self._block_index = -1
        self._block: List[int] = []

    def source_at(self, n: int) -> int:
        """The source index of draw ``n`` (0-based)."""
        block, slot = divmod(n, self.BLOCK)
        if block != self._block_index:
            order = list(self._template)
            random.Random(f"mixture:{self.seed}:{block}").shuffle(order)
            self._block_index, self._block = block, order
        return self._block[slot]
