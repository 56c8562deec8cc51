"""Keep gloo's worker threads from starting OpenMP pools of their own (CPU throughput).

torch's OpenMP build fixes a thread's intra-op thread count the first time that thread runs a
parallel ATen op, from ``torch.get_num_threads()`` at that moment. gloo runs collectives on
long-lived worker threads, and an ``all_gather`` (``all_gather_object``, ``gather_object``: what
``dist_checkpointing`` uses to agree on metadata) copies tensors there. With 2 intra-op threads
that copy starts a second OpenMP pool; libgomp then manages more threads than there are CPUs and
stops spin-waiting between parallel regions, so every later op in the trainer pays a futex
wake-up. Measured on a 2-core CPU, default run: 0.31 s per step before its first checkpoint,
0.61 s after it, for the rest of the run; 0.32 s with the save inside ``serial_collectives``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def serial_collectives() -> Iterator[None]:
    """Run a block of collectives with one intra-op thread, then restore the count.

    Threads that first run ATen inside the block stay serial for good; the calling thread gets
    its thread count back. A gloo group has several worker threads, so a collective outside any
    such block may still reach one that starts a pool; in a one-process run the only ones that
    copy on gloo threads are checkpoint save and load, which run inside. Meant for blocks that
    are collective- and I/O-bound, where one compute thread costs nothing measurable."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
