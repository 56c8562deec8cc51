"""serial_collectives keeps long-lived worker threads (gloo's, in training) from starting OpenMP
pools of their own (see mm1_moe/runtime/threads.py). A queue-fed thread stands in for gloo's
worker, so the test knows which thread runs each op. Checked by counting the process's OS threads,
not by timing: an OpenMP pool started on a worker adds (intra-op threads - 1) threads that stay
while the worker lives."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, queue, threading, torch
    from mm1_moe.runtime.threads import serial_collectives

    def os_threads():
        return len(os.listdir("/proc/self/task"))

    class Worker:  # a long-lived thread that runs what it is given, as gloo's run loop does
        def __init__(self):
            self.jobs, self.done = queue.Queue(), queue.Queue()
            threading.Thread(target=self._loop, daemon=True).start()
            self.done.get()

        def _loop(self):
            self.done.put(None)
            while True:
                self.jobs.get()()
                self.done.put(None)

        def run(self, job):
            self.jobs.put(job)
            self.done.get()

    def copy():  # 1M floats: above ATen's grain size, so the op is parallel
        torch.empty(1_000_000).copy_(torch.ones(1_000_000))

    torch.set_num_threads(2)
    copy()  # the main thread's own pool exists before counting
    guarded = Worker()
    before = os_threads()
    with serial_collectives():
        guarded.run(copy)
    assert torch.get_num_threads() == 2
    inside = os_threads()
    guarded.run(copy)  # outside the block it keeps the count it started with
    after = os_threads()
    control = Worker()
    fresh = os_threads()
    control.run(copy)  # a worker whose first op runs at 2 intra-op threads: its own pool
    print(before, inside, after, fresh, os_threads())
""")


def test_worker_threads_started_inside_the_block_stay_serial():
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, inside, after, fresh, unguarded = (int(n) for n in proc.stdout.split())
    assert inside == before and after == before, (before, inside, after)
    assert unguarded == fresh + 1, (fresh, unguarded)  # the control: one more OpenMP thread


# --- CpuShare: the thread count follows the cores other processes leave free ----------------------
def _share(monkeypatch, samples, clock=(), max_threads=2, cores=2):
    """A CpuShare fed (time, machine busy seconds, our CPU seconds) samples instead of psutil,
    and ``clock``: the time each update() reads before deciding whether to take one."""
    import torch

    from mm1_moe.runtime import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: state["threads"])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: state.update(threads=n))
    monkeypatch.setattr(threads.CpuShare, "_sample", staticmethod(lambda: samples.pop(0)))
    times = iter(clock)
    monkeypatch.setattr(threads.time, "monotonic", lambda: next(times))
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(cores)),
                        raising=False)
    state = {"threads": max_threads}
    reports = []
    return threads.CpuShare(interval_s=5.0, report=reports.append), state, reports


def test_cpu_share_steps_down_for_a_busy_neighbour_and_back_up(monkeypatch):
    samples = [(0.0, 0.0, 0.0),
               (1.0, 1.9, 1.2),     # start-up: we used 1.2 cores, someone else 0.7 -> 1 thread
               (7.0, 13.9, 7.2),    # others 1.0 core -> stays at 1
               (13.0, 25.3, 18.6)]  # others 0.0: the neighbour left -> back to 2
    clock = [1.0, 3.0, 7.0, 13.0]  # at 3.0 a look is not due yet (interval 5 s): no sample
    share, state, reports = _share(monkeypatch, samples, clock)
    assert share.update() == 1 and state["threads"] == 1
    assert share.update() == 1
    assert share.update() == 1
    assert share.update() == 2 and state["threads"] == 2
    assert reports == ["cpu threads: 2 -> 1 (other processes used 0.7 of 2 cores)",
                       "cpu threads: 1 -> 2 (other processes used 0.0 of 2 cores)"]


def test_cpu_share_keeps_an_explicit_omp_num_threads(monkeypatch):
    share, state, _ = _share(monkeypatch, [(0.0, 0.0, 0.0)])
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    from mm1_moe.runtime.threads import CpuShare

    assert CpuShare().enabled is False
    assert share.threads_for(others=1.8) == 1 and share.threads_for(others=0.3) == 2
