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

import os
import time
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


class CpuShare:
    """Intra-op threads sized to the cores other processes leave free (CPU runs only).

    With more runnable threads than cores, libgomp throttles its spin-waits and every small op
    of ours pays a futex wake-up (see the module note). So at each step boundary, at most every
    ``interval_s``, we read how much CPU the rest of the machine used since the last look
    (system-wide busy time minus our own process's) and set ``torch.set_num_threads`` to the
    cores left, rounded, between 1 and the count we started with. An explicit
    ``OMP_NUM_THREADS`` is the user's choice: left alone. Measured with
    ``benchmarks/bench_cpu_threads.py`` on 2 cores (default run, 40 steps, median of 3): idle
    19.5 s (22.2 s at a fixed 2 threads, 25.8 s at 1); beside one busy process 27.0 s, 1.39x
    idle (80.4 s, 3.61x, at a fixed 2 threads).

    The thread count changes the order of some float reductions, so a run whose count changes
    may differ from an idle run in the last bits; set ``OMP_NUM_THREADS`` for bit-exact runs.
    """

    FIRST_LOOK_S = 0.5  # shortest window worth reading: /proc/stat counts in 10 ms ticks

    def __init__(self, interval_s: float = 5.0, report=None):
        self.interval_s, self.report = interval_s, report
        self.max_threads = torch.get_num_threads()
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            (os.cpu_count() or 1)
        self.enabled = "OMP_NUM_THREADS" not in os.environ and self.max_threads > 1
        self._last = self._sample() if self.enabled else None
        self._first = True  # the first look may come sooner: over the start-up (model build)

    @staticmethod
    def _sample():
        import psutil  # a dependency (checkpoint saving needs it); imported where it is used

        system = psutil.cpu_times()
        idle = system.idle + getattr(system, "iowait", 0.0)
        # guest time is already counted in user time
        guest = getattr(system, "guest", 0.0) + getattr(system, "guest_nice", 0.0)
        busy = sum(system) - idle - guest
        ours = psutil.Process().cpu_times()
        return time.monotonic(), busy, ours.user + ours.system

    def others_busy_cores(self, before, after) -> float:
        """Cores' worth of CPU the other processes used between two samples."""
        wall = after[0] - before[0]
        if wall <= 0:
            return 0.0
        return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / wall)

    def threads_for(self, others: float) -> int:
        return max(1, min(self.max_threads, int(self.cores - others + 0.5)))

    def update(self) -> int:
        """Re-size the intra-op pool if due; returns the thread count in force."""
        due = self.FIRST_LOOK_S if self._first else self.interval_s
        if not self.enabled or time.monotonic() - self._last[0] < due:
            return torch.get_num_threads()  # the clock first: psutil only when a look is due
        now = self._sample()
        self._first = False
        others = self.others_busy_cores(self._last, now)
        self._last = now
        threads = self.threads_for(others)
        if threads != torch.get_num_threads():
            if self.report is not None:
                self.report(f"cpu threads: {torch.get_num_threads()} -> {threads} (other "
                            f"processes used {others:.1f} of {self.cores} cores)")
            torch.set_num_threads(threads)
        return threads
