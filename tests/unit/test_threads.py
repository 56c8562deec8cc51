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
