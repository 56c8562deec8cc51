"""Every parallel layout trains the tiny dense model exactly like one process does.

``run_train.py`` trains ``configs/tiny-dense.yaml`` for 4 steps (``layout_invariant_init``: every
layout starts from the same weights; the synthetic data gives every layout the same global
batch). The single-process run is the baseline; each layout runs under
``torch.distributed.run`` on gloo and must reproduce its losses and gradient norms to fp32
round-off. The micro-batch size changes how many micro-batches make up the global batch, not the
batch itself, but it changes the order of the sums, so each micro-batch size gets its own
baseline.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Dict, List

import pytest

from _launch import REPO, TIMEOUT_S, _env, _micro_batch, _run, train_cmd

pytestmark = pytest.mark.distributed

STEPS = 4
BASE_MICRO_BATCH = 4  # configs/tiny-dense.yaml
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """``baseline(micro_batch_size)``: the single-process run's result, computed once per
    micro-batch size for the whole module."""
    cache: Dict[int, Dict[str, List[float]]] = {}
    folder = tmp_path_factory.mktemp("baseline")

    def get(micro_batch_size: int) -> Dict[str, List[float]]:
        if micro_batch_size not in cache:
            cmd = train_cmd(1, [f"train.steps={STEPS}", f"train.micro_batch_size={micro_batch_size}"],
                            folder / f"run-mbs{micro_batch_size}")
            cache[micro_batch_size] = _run(cmd, folder / f"mbs{micro_batch_size}.json",
                                           f"single-process baseline (micro batch "
                                           f"{micro_batch_size})")
        return cache[micro_batch_size]

    return get


LAYOUTS = [
    pytest.param(2, ["parallel.tensor_parallel=2"], id="tp2-tensor-parallel"),
    pytest.param(2, ["parallel.pipeline_parallel=2"], id="pp2-1f1b"),
    pytest.param(2, [], id="dp2-data-parallel-grad-allreduce"),
    pytest.param(2, ["train.distributed_optimizer=true"], id="dp2-distributed-optimizer"),
    pytest.param(2, ["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2",
                     "train.micro_batch_size=1"], id="pp2-vpp2-interleaved-1f1b"),
    pytest.param(4, ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"],
                 id="tp2xpp2-model-parallel"),
    pytest.param(4, ["parallel.pipeline_parallel=2", "train.micro_batch_size=2"],
                 id="pp2xdp2-pipeline-plus-data"),
    pytest.param(4, ["parallel.tensor_parallel=2", "train.micro_batch_size=2"],
                 id="tp2xdp2-tensor-plus-data"),
]


@pytest.mark.parametrize("nproc, overrides", LAYOUTS)
def test_layout_matches_single_process(nproc, overrides, baseline, tmp_path):
    expected = baseline(_micro_batch(overrides, BASE_MICRO_BATCH))
    cmd = train_cmd(nproc, [f"train.steps={STEPS}", *overrides], tmp_path / "run")
    got = _run(cmd, tmp_path / "result.json", f"{nproc} ranks {' '.join(overrides) or 'DP'}")

    assert len(got["losses"]) == len(expected["losses"]) == STEPS
    assert got["losses"] == pytest.approx(expected["losses"], rel=RTOL, abs=ATOL), (
        f"losses {got['losses']} != single process {expected['losses']}")
    assert got["grad_norms"] == pytest.approx(expected["grad_norms"], rel=RTOL, abs=ATOL), (
        f"grad norms {got['grad_norms']} != single process {expected['grad_norms']}")
    assert got["lrs"] == pytest.approx(expected["lrs"], rel=1e-12)


@pytest.mark.parametrize("overrides, message", [
    pytest.param(["parallel.pipeline_parallel=3"],
                 "model.decoder.num_layers (4) is not divisible by parallel.pipeline_parallel (3)",
                 id="layers-not-divisible-by-pp"),
    pytest.param(["parallel.tensor_parallel=2"],
                 "world size (1) is not divisible by parallel.tensor_parallel (2)",
                 id="world-not-divisible-by-tp"),
])
def test_bad_layout_exits_2_naming_the_path(overrides, message, tmp_path):
    cmd = [sys.executable, "-m", "mm1_moe.cli", "train", "--config",
           str(REPO / "configs" / "tiny-dense.yaml"), "train.steps=1",
           f"train.output_dir={tmp_path}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"
    assert message in proc.stderr, proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr
