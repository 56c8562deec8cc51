"""Shared by the distributed tests: run ``run_train.py`` as one process or under
``torch.distributed.run`` and read back its JSON result (losses, grad norms, learning rates).

Not a test module (pytest collects ``test_*.py`` only); the test modules import it from their
own folder, which pytest puts on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SCRIPT = HERE / "run_train.py"
TIMEOUT_S = 240

Result = Dict[str, List[float]]


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TORCHDYNAMO_DISABLE="1", PYTHONWARNINGS="ignore::UserWarning")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a baseline must not join an outer process group
    return env


def _run(cmd: Sequence[str], out: Path, what: str) -> Result:
    env = _env()
    env["MM1_RESULT"] = str(out)
    try:
        proc = subprocess.run(list(cmd), cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        tail = (err.stderr or b"")[-4000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        pytest.fail(f"{what}: timed out after {TIMEOUT_S} s\n--- stderr tail ---\n{tail}")
    if proc.returncode != 0 or not out.is_file():
        pytest.fail(f"{what}: exit code {proc.returncode}\n$ {' '.join(cmd)}\n"
                    f"--- stdout tail ---\n{proc.stdout[-2000:]}\n"
                    f"--- stderr tail ---\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def _micro_batch(overrides: Sequence[str], default: int) -> int:
    """The ``train.micro_batch_size`` that ``overrides`` set, else ``default``."""
    size = default
    for item in overrides:
        if item.startswith("train.micro_batch_size="):
            size = int(item.split("=", 1)[1])
    return size


def train_cmd(nproc: int, overrides: Sequence[str], output_dir: Path,
              config: Optional[Path] = None) -> List[str]:
    """``run_train.py`` with ``overrides``: one plain process for ``nproc == 1``, else
    ``nproc`` ranks under ``torch.distributed.run``. Each run gets its own ``output_dir``, neither
    resumes from nor saves a checkpoint (the config's shared ``runs/...`` folder would make a
    later run resume from an earlier one's final checkpoint and train no steps)."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    isolate = [f"train.output_dir={output_dir}", "train.resume=false", "train.save_final=false",
               "train.save_interval=0"]
    return [*launcher, str(SCRIPT), *(["--config", str(config)] if config else []), *overrides,
            *isolate]


def kill_9_after(cmd: Sequence[str], target: Path, env: Dict[str, str], wait_s: float = 240) -> None:
    """Start ``cmd``, SIGKILL it as soon as ``target`` exists (e.g. a checkpoint's
    complete.json), and fail unless ``target`` was written before the kill."""
    import signal
    import time

    proc = subprocess.Popen(list(cmd), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + wait_s
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert target.exists(), f"the run ended before it wrote {target}"
