"""Checkpoints that survive failures: kill -9 mid-run and restart gives the losses of an
uninterrupted run bit for bit; a corrupt newest checkpoint is reported and the previous one
used; a half-written (.tmp) checkpoint is ignored; a TP=2 checkpoint loads into TP=1."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _launch import kill_9_after

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny-dense.yaml")


def _env():
    return dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")


def _cmd(out: Path, *overrides, nproc: int = 1):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc-per-node={nproc}"] if nproc > 1 else [sys.executable])
    return [*launcher, "-m", "mm1_moe.cli", "train", "--config", TINY,
            f"train.output_dir={out}", "train.steps=8", "train.save_interval=2", *overrides]


def _run(out: Path, *overrides, nproc: int = 1) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(out, *overrides, nproc=nproc), cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _losses(out: Path):
    """step -> loss from metrics.jsonl (a restarted run appends; later lines win)."""
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        losses[record["step"]] = record["loss"]
    return losses


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    _run(out)
    return _losses(out)


def test_kill_9_and_restart_resumes_bit_exact(tmp_path, uninterrupted):
    out = tmp_path / "killed"
    kill_9_after(_cmd(out, "train.log_interval=1"),
                 out / "checkpoints" / "step_00000004" / "complete.json", _env())
    restarted = _run(out)
    assert "resumed from" in restarted.stdout
    assert _losses(out) == uninterrupted  # every step, bit for bit (JSON keeps all digits)


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, uninterrupted):
    out = tmp_path / "corrupt"
    _run(out, "train.steps=4", "train.save_final=false")
    newest = out / "checkpoints" / "step_00000004"
    for name in os.listdir(newest):
        if name.endswith(".distcp"):
            (newest / name).write_bytes(b"not a checkpoint")
    half = out / "checkpoints" / "step_00000006.tmp"  # a crash mid-save: must be ignored
    shutil.copytree(out / "checkpoints" / "step_00000002", half)
    proc = _run(out)
    assert f"checkpoint {newest} could not be loaded" in proc.stdout
    assert "resumed from" in proc.stdout and "step_00000002 at step 2" in proc.stdout
    assert _losses(out) == uninterrupted


def test_tensor_parallel_checkpoint_loads_into_one_process(tmp_path, uninterrupted):
    tp2 = tmp_path / "tp2"
    _run(tp2, "train.steps=8", "parallel.tensor_parallel=2", "train.save_final=false", nproc=2)
    one = tmp_path / "one"
    proc = _run(one, f"train.load_from={tp2 / 'checkpoints' / 'step_00000004'}",
                "train.save_final=false")
    assert "resumed from" in proc.stdout
    resumed = _losses(one)
    assert sorted(resumed) == [5, 6, 7, 8]
    for step, loss in resumed.items():  # TP=2 and TP=1 agree to fp32 rounding
        assert loss == pytest.approx(uninterrupted[step], rel=1e-5)


def test_missing_load_from_is_named(tmp_path):
    proc = subprocess.run(_cmd(tmp_path / "x", f"train.load_from={tmp_path / 'nowhere'}"),
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "nowhere" in proc.stderr and "does not exist" in proc.stderr


def test_mm1_moe_default_run_resumes_exactly(tmp_path):
    """The default run (MM1 with images, MoE, the data mixture): a resumed run restores the
    model chunks (MM1Model names its decoder as GPTModel does), the optimizer and the data
    loader's position, so steps 3-4 repeat bit for bit."""
    out = tmp_path / "mm1"
    base = [sys.executable, "-m", "mm1_moe.cli", "train", f"train.output_dir={out}",
            "train.steps=4", "train.save_interval=2", "train.log_interval=1"]
    for attempt in range(2):
        proc = subprocess.run(base, cwd=REPO, env=_env(), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if attempt == 0:
            first = _losses(out)
            shutil.rmtree(out / "checkpoints" / "step_00000004")
    assert "resumed from" in proc.stdout and "step_00000002 at step 2" in proc.stdout
    assert _losses(out) == first
