"""What every part of the MM1 data pipeline shares: the error type and the skip counters.

Bad input is handled one of two ways, never by hanging:
  * stop: ``DataError`` with the path named (a missing shard, a pattern that matches nothing, a
    source that yields no usable sample in a whole pass over its files, a tokenizer that does not
    fit the model);
  * skip and count: ``SkipCounter`` records one count per kind (``corrupt_image``,
    ``empty_caption``, ``missing_image_ref``, ``truncated_shard``, ...) and logs the first few
    occurrences of each kind with the file and key, so a run shows what it dropped and why.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Dict, List, Set, Tuple

LOG = logging.getLogger("mm1_moe.data")


class DataError(ValueError):
    """Input that the pipeline cannot use at all; the message names the file or pattern."""


class SkipCounter:
    """Counts skipped inputs by kind; logs the first ``log_first`` of each kind.

    Each input counts once: a source that wraps around to its next epoch, or a shard opened
    again, meets the same damaged input again; that adds to ``repeats``, not to ``counts``, and
    logs nothing (before, a 1-file damage was reported once per epoch and counted per reopen)."""

    def __init__(self, log_first: int = 3):
        self.counts: Counter = Counter()
        self.examples: Dict[str, List[str]] = {}
        self.log_first = log_first
        self.repeats = 0
        self._seen: Set[Tuple[str, str, str]] = set()

    def skip(self, kind: str, where: str, why: str = "") -> None:
        key = (kind, where, why)
        if key in self._seen:
            self.repeats += 1
            return
        self._seen.add(key)
        self.counts[kind] += 1
        message = f"{where}: {why}" if why else where
        seen = self.examples.setdefault(kind, [])
        if len(seen) < max(self.log_first, 1):  # keep one example even when not logging
            seen.append(message)
            if self.log_first:
                LOG.warning("skipped (%s) %s", kind, message)

    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> Dict[str, int]:
        return dict(sorted(self.counts.items()))

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"
