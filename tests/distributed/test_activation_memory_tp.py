"""The memory planner at TP=2, with and without sequence parallelism: on each rank the bytes
autograd saves per dense and per MoE decoder layer (tests/distributed/run_saved_bytes.py) are
within 10% of ``mm1_moe.activations``' plan for that layout (the single-process checks are in
tests/unit/test_activation_memory.py)."""

from __future__ import annotations

import json
import sys

import pytest

from _launch import HERE, _run

pytestmark = pytest.mark.distributed

SCRIPT = HERE / "run_saved_bytes.py"


@pytest.mark.parametrize("overrides", [
    pytest.param(["parallel.tensor_parallel=2"], id="tp2"),
    pytest.param(["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"], id="tp2-sp"),
    pytest.param(["parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
                  "train.dtype=bf16"], id="tp2-sp-bf16"),
])
def test_saved_bytes_per_layer_as_planned_at_tp2(overrides, tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(SCRIPT), *overrides]
    _run(cmd, out, f"saved bytes, 2 ranks {' '.join(overrides)}")
    for rank in range(2):
        got = json.loads((tmp_path / f"result.json.rank{rank}").read_text())
        for kind, planned in got["planned"].items():
            measured = got["measured"][kind]
            assert abs(measured - planned) <= 0.10 * planned, (
                f"rank {rank} {kind} layer: measured {measured:,.0f} bytes, planned "
                f"{planned:,.0f} ({measured / planned - 1:+.1%})")
