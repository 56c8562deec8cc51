"""The distributed optimizer's checkpoints resume and reshard on gloo, Adam's moments and step
compared tensor by tensor by global name after every move (``optimizer_state.merge_adam_state``
over every rank's pieces: a moment dropped, zeroed or misplaced on any rank fails).

configs/tiny-moe.yaml (dense + expert optimizers), ``train.distributed_optimizer=true``, micro
batch 2 (so DP=4 divides the global batch of 8). Data parallelism is world / (TP x PP); expert
parallelism splits it, so 4 ranks with EP=2 are "DP2 x EP2" (experts: EP 2 x expert-DP 2; dense:
DP 4) and 2 ranks with EP=2 are DP=2 with EP=2 (dense DP 2, expert-DP 1). One chain of four
launches on one folder covers every move:

1. A: 4 ranks (DP2 x EP2) train 4 steps, saving at 2 and 4.
2. The same run again, kill -9 (launcher and every rank) once step 2 is saved; restarted, it
   resumes at 2: steps 3-4 bit-identical to A, and Adam's state at step 4 equal to A's.
3. 2 ranks (DP=2, EP=2) load A@4 (reshard), save B; B resumed in the same layout trains bit for
   bit as the run that saved it; B -> non-distributed optimizer (saved as E) -> distributed
   again ("and back").
4. The restart of step 2, after its training: B (DP=2) loads at DP=4 (4 ranks, EP=2).
5. In this process: B loads at DP=1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from _launch import REPO, TIMEOUT_S, _env

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).resolve().parent / "run_adam_moves.py"
CONFIG = REPO / "configs" / "tiny-moe.yaml"
BASE = ["kernels.moe=torch", "train.micro_batch_size=2", "train.distributed_optimizer=true"]
DP2xEP2 = ["parallel.expert_parallel=2"]  # on 4 ranks


def _cmd(nproc: int, out: Path, *args: str) -> List[str]:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*launcher, str(SCRIPT), "--config", str(CONFIG), "--out", str(out / "result.json"),
            *args]


def _run(nproc: int, out: Path, *args: str) -> Dict:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(_cmd(nproc, out, *args), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return json.loads((out / "result.json").read_text())


def _losses(run: Path) -> Dict[int, float]:
    """step -> loss from metrics.jsonl (a restarted run appends; later lines win)."""
    return {r["step"]: r["loss"] for r in map(json.loads,
                                               (run / "metrics.jsonl").read_text().splitlines())}


def _adam(folder: Path):
    from mm1_moe.training.optimizer_state import merge_adam_state

    pieces = [p for f in sorted(folder.glob("rank*.pt")) for p in torch.load(f)]
    assert pieces, f"no Adam state written under {folder}"
    return merge_adam_state(pieces)


def assert_same_adam_state(got, expected, step: float, what: str):
    assert sorted(got) == sorted(expected), what
    assert any(".experts." in key for key in got), what
    for key, entry in expected.items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(got[key][name], entry[name]), f"{what}: {key} {name}"
        assert entry["exp_avg_sq"].any(), f"{what}: {key}"
        assert got[key]["step"] == entry["step"] == step, f"{what}: {key} step"


def _descendants(pid: int) -> List[int]:
    """``pid`` and every process below it (torch.distributed.run starts its ranks in their own
    sessions, so a process-group kill would miss them)."""
    children: Dict[int, List[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, i = [pid], 0
    while i < len(found):
        found += children.get(found[i], [])
        i += 1
    return found


def _kill_9(proc: subprocess.Popen) -> None:
    for _ in range(3):  # a rank may be starting a helper process as we look
        for pid in _descendants(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    proc.wait(timeout=30)


def test_distributed_optimizer_resumes_and_reshards(tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)  # step 5 starts a one-rank runtime here
    # 1. uninterrupted, DP2 x EP2
    a = tmp_path / "a"
    train_a = [*BASE, *DP2xEP2, "train.steps=4", "train.save_interval=2",
               f"train.output_dir={a}"]
    _run(4, a, "--dump", str(a / "adam"), *train_a)
    at_4 = _adam(a / "adam")
    a_4 = a / "checkpoints" / "step_00000004"

    # 2. the same run killed with -9 after its step-2 checkpoint ...
    k = tmp_path / "killed"
    train_k = [o.replace(str(a), str(k)) for o in train_a]
    k.mkdir()
    proc = subprocess.Popen(_cmd(4, k, "--dump", str(k / "adam"), *train_k), cwd=REPO,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = k / "checkpoints" / "step_00000002" / "complete.json"
    deadline = time.time() + TIMEOUT_S
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    _kill_9(proc)
    assert target.exists(), "the run ended before its step-2 checkpoint"

    # 3. DP=2 with EP=2: A@4 resharded, saved as B; B resumed (bit for bit), to plain and back
    b, e = tmp_path / "b", tmp_path / "e"
    moves = _run(2, b, "--more", "2", "--dump", str(b / "adam-from-a"),
                 "--move", f"distributed+train:{b / 'checkpoints' / 'step_00000004'}:"
                           f"{b / 'adam-resumed'}",
                 "--move", f"plain:{b / 'checkpoints' / 'step_00000004'}:{e / 'adam'}:{e}",
                 "--move", f"distributed:{e / 'checkpoints' / 'step_00000004'}:{b / 'adam-back'}",
                 *BASE, "parallel.expert_parallel=2", "train.steps=4",
                 f"train.load_from={a_4}", f"train.output_dir={b}")
    b_4 = b / "checkpoints" / "step_00000004"

    # 4. ... restarted: resumes at step 2, then B loads at DP=4
    restarted = _run(4, k, "--dump", str(k / "adam"),
                     "--move", f"distributed:{b_4}:{k / 'adam-dp4'}", *train_k)
    assert len(restarted["losses"]) == 2  # steps 3 and 4
    assert _losses(k) == _losses(a)  # every step, bit for bit
    assert_same_adam_state(_adam(k / "adam"), at_4, 4.0, "kill -9 and resume at DP2 x EP2")

    assert_same_adam_state(_adam(b / "adam-from-a"), at_4, 4.0, "DP2 x EP2 -> DP=2, EP=2")
    assert_same_adam_state(_adam(b / "adam-resumed"), at_4, 4.0, "resume at DP=2, EP=2")
    resumed = moves["more"][f"distributed+train:{b_4}:{b / 'adam-resumed'}"]
    assert resumed == moves["more"]["trained"]  # steps 5-6 of the run that saved B
    assert_same_adam_state(_adam(e / "adam"), at_4, 4.0, "distributed -> plain optimizer")
    assert_same_adam_state(_adam(b / "adam-back"), at_4, 4.0, "plain -> distributed again")
    assert_same_adam_state(_adam(k / "adam-dp4"), at_4, 4.0, "DP=2 -> DP=4")

    # 5. B at DP=1, in this process
    _load_at_dp1(b_4, tmp_path / "dp1", at_4)


def _load_at_dp1(checkpoint: Path, out: Path, expected) -> None:
    from mm1_moe.config import load_config
    from mm1_moe.runtime import initialize, shutdown
    from mm1_moe.training.loop import Trainer
    from mm1_moe.training.optimizer_state import adam_state_pieces, merge_adam_state

    config = load_config(str(CONFIG), [*BASE, f"train.output_dir={out}"])
    runtime = initialize(config)
    try:
        trainer = Trainer(config, runtime)
        assert trainer.load(str(checkpoint))["step"] == 4
        got = merge_adam_state(adam_state_pieces(trainer.model, trainer.optimizer))
    finally:
        shutdown()
    assert_same_adam_state(got, expected, 4.0, "DP=2 -> DP=1")
