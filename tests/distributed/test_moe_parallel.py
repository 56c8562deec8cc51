"""Every (TP, EP, PP) layout trains the tiny MoE model exactly like one process does.

``run_train.py --config configs/tiny-moe.yaml`` (4 layers, 4 experts top-2 in layers 1 and 3,
``layout_invariant_init``) trains 3 steps; the single-process run is the baseline and each layout
runs under ``torch.distributed.run`` on gloo. Losses AND gradient norms must agree to fp32
round-off: Adam normalises the update, so a gradient off by a constant factor (an expert grad
summed over ranks that saw the same tokens, or not reduced at all) barely moves the losses but
shows in the norm. The data-parallel size is world / (TP x PP); the global batch of 8 must be
divisible by micro-batch x DP. Each (micro-batch size, MoE kernels) pair gets its own baseline,
since both change the order of the sums.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import pytest

from _launch import REPO, _micro_batch, _run, train_cmd

pytestmark = pytest.mark.distributed

CONFIG = REPO / "configs" / "tiny-moe.yaml"
STEPS = 3
BASE_MICRO_BATCH = 4  # configs/tiny-moe.yaml
RTOL, ATOL = 1e-5, 1e-6


def _kernels(overrides) -> str:
    found = [o.split("=", 1)[1] for o in overrides if o.startswith("kernels.moe=")]
    return found[-1] if found else "torch"


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """``baseline(micro_batch_size, kernels)``: the single-process run, once per pair."""
    cache: Dict[Tuple[int, str], Dict[str, List[float]]] = {}
    folder = tmp_path_factory.mktemp("moe-baseline")

    def get(micro_batch_size: int, kernels: str) -> Dict[str, List[float]]:
        key = (micro_batch_size, kernels)
        if key not in cache:
            cmd = train_cmd(1, [f"train.steps={STEPS}", f"train.micro_batch_size={micro_batch_size}",
                                f"kernels.moe={kernels}"],
                            folder / f"run-mbs{micro_batch_size}-{kernels}", CONFIG)
            cache[key] = _run(cmd, folder / f"mbs{micro_batch_size}-{kernels}.json",
                              f"single-process MoE baseline (micro batch {micro_batch_size}, "
                              f"kernels.moe={kernels})")
        return cache[key]

    return get


def _layout(tp: int, ep: int, pp: int, nproc: int, *extra: str, kernels: str = "torch",
            recompute: str = "none"):
    overrides = [f"parallel.tensor_parallel={tp}", f"parallel.expert_parallel={ep}",
                 f"parallel.pipeline_parallel={pp}", f"kernels.moe={kernels}",
                 f"train.recompute={recompute}", *extra]
    dp = nproc // (tp * pp)
    name = f"tp{tp}-ep{ep}-pp{pp}-dp{dp}" + ("" if kernels == "torch" else f"-{kernels}")
    name += "" if recompute == "none" else f"-recompute-{recompute}"
    return pytest.param(nproc, overrides, id=name)


LAYOUTS = [
    # experts split over TP ranks that route the same tokens (duplicate-token grad scaling)
    _layout(2, 1, 1, 2),
    # all-to-all dispatch across the data-parallel ranks
    _layout(1, 2, 1, 2),
    # TP x EP with an expert-data-parallel group of 2: expert grads reduced over it
    _layout(2, 2, 1, 4),
    # one MoE layer per stage, EP inside each stage, two micro-batches in flight
    _layout(1, 2, 2, 4, "train.micro_batch_size=2"),
    _layout(1, 2, 1, 2, kernels="triton"),
    # activation recomputation equals the baseline without it (tests/unit/test_recompute.py
    # checks routing and every grad on one process): core attention and the experts' SwiGLU
    # rerun under TP; whole layers, router and all-to-all included, rerun inside 1F1B under EP
    _layout(2, 1, 1, 2, recompute="selective"),
    _layout(1, 2, 2, 4, "train.micro_batch_size=2", recompute="full"),
]


@pytest.mark.parametrize("nproc, overrides", LAYOUTS)
def test_moe_layout_matches_single_process(nproc, overrides, baseline, tmp_path):
    expected = baseline(_micro_batch(overrides, BASE_MICRO_BATCH), _kernels(overrides))
    cmd = train_cmd(nproc, [f"train.steps={STEPS}", *overrides], tmp_path / "run", CONFIG)
    got = _run(cmd, tmp_path / "result.json", f"{nproc} ranks {' '.join(overrides)}")

    assert len(got["losses"]) == len(expected["losses"]) == STEPS
    assert got["losses"] == pytest.approx(expected["losses"], rel=RTOL, abs=ATOL), (
        f"losses {got['losses']} != single process {expected['losses']}")
    assert got["grad_norms"] == pytest.approx(expected["grad_norms"], rel=RTOL, abs=ATOL), (
        f"grad norms {got['grad_norms']} != single process {expected['grad_norms']}")
    assert got["lrs"] == pytest.approx(expected["lrs"], rel=1e-12)
