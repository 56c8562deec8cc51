"""The checkpoint writer's helper process ends with the trainer (``when: always``, Linux).

megatron-core's ``FileSystemWriterAsync`` gets its results queue from a
``multiprocessing.Manager`` (a spawned server process, ~270 MB resident) created at the first
save and shut down by an exit handler. A trainer killed with SIGKILL runs no exit handler: the
manager, its parent gone, waits on its socket forever, one per rank and kill (seen in the kill -9
tests: each left one behind). The replacement starts the same manager with an initializer that
asks the kernel to SIGKILL it when the process that started it exits (``prctl
PR_SET_PDEATHSIG``; it holds only a queue of write results, nothing to flush). The kernel
tracks the starting *thread*: mm1-moe saves from the main thread; a save from a thread that
ends before the process would lose the manager with it. Elsewhere than Linux the replacement
is upstream's."""

from __future__ import annotations

import ctypes
import importlib
import multiprocessing
import os
import signal
import sys
from typing import List

from .record import Patch, Revert, missing_text, rebind

TARGET = ("megatron.core.dist_checkpointing.strategies.filesystem_async:"
          "_get_write_results_queue")
_MODULE = TARGET.partition(":")[0]
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """Manager initializer: SIGKILL this process when its parent exits (Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))


def get_write_results_queue():
    """Upstream's ``_get_write_results_queue``, its manager started with ``die_with_parent``."""
    module = importlib.import_module(_MODULE)
    if module._results_queue is None:
        from multiprocessing.managers import SyncManager

        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(initializer=die_with_parent)
        module._results_manager = manager  # kept alive (and shut down at exit) with the queue
        module._results_queue = manager.Queue()
    return module._results_queue


def check() -> List[str]:
    return missing_text(TARGET, 'mp.get_context("spawn")', "Manager().Queue()")


def apply() -> Revert:
    return rebind(TARGET, get_write_results_queue)


def manager_pid() -> int:
    """The pid of the manager behind the module's results queue (started if need be)."""
    module = importlib.import_module(_MODULE)
    module._get_write_results_queue()
    return module._results_manager._process.pid


def probe() -> None:
    module = importlib.import_module(_MODULE)
    assert module._get_write_results_queue is get_write_results_queue
    assert os.getpid() != manager_pid()


PATCH = Patch(
    name="ckpt_writer_manager",
    targets=(TARGET,),
    when="always",
    why="the checkpoint writer's multiprocessing Manager outlives a SIGKILLed trainer: one "
        "orphaned ~270 MB process per rank and kill.",
    check=check,
    apply=apply,
    probe=probe,
)
