"""Every layout trains the tiny MM1-MoE on the MM1 mixture (images, packed documents, uneven
loss masks) exactly like one process, and reports the same MoE statistics.

The loader deals the packed stream in whole micro-batches (``mm1_moe/data/loader.py``), so every
data-parallel rank trains on micro-batches one process would form too: the mean of micro-batch
losses, the load-balancing and z-losses, and the capacity drops are the same in every layout.
Dealing single sequences round-robin gave 5.599941 at DP=2 for one process's 5.600783 (step 1,
micro-batch 2). The MoE statistics (expert loads, dropped slots, aux and z losses) are reduced
over the ranks that saw different tokens; with rank 0's alone, EP=2 reported 19 dropped slots
where one process counts 36.
"""

from __future__ import annotations

import pytest

from _launch import REPO, _run, train_cmd

pytestmark = pytest.mark.distributed

CONFIG = REPO / "configs" / "tiny-mm1-moe.yaml"
STEPS = 2
# capacity factor 1.0: slots are dropped, so the dropped count is checked for real
COMMON = [f"train.steps={STEPS}", "train.log_interval=1", "data.seq_length=128",
          "train.micro_batch_size=2", "train.global_batch_size=8",
          "model.decoder.moe.capacity_factor=1.0"]
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixture-baseline")
    return _run(train_cmd(1, COMMON, folder / "run", CONFIG), folder / "result.json",
                "single-process MM1 mixture baseline")


def _assert_same_moe(got, expected):
    assert len(got) == len(expected) == STEPS
    for step_got, step_expected in zip(got, expected):
        assert step_got.keys() == step_expected.keys() and step_got
        for layer, stats in step_expected.items():
            for name, value in stats.items():
                assert step_got[layer][name] == pytest.approx(value, rel=1e-4, abs=1e-6), (
                    f"layer {layer} {name}: {step_got[layer][name]} != one process's {value}")


@pytest.mark.parametrize("nproc, overrides", [
    pytest.param(2, [], id="dp2"),
    pytest.param(2, ["parallel.expert_parallel=2"], id="ep2"),
    pytest.param(2, ["parallel.pipeline_parallel=2"], id="pp2-images-on-stage-0"),
])
def test_mixture_layout_matches_single_process(nproc, overrides, single, tmp_path):
    got = _run(train_cmd(nproc, [*COMMON, *overrides], tmp_path / "run", CONFIG),
               tmp_path / "result.json", f"{nproc} ranks {' '.join(overrides) or 'DP'}")
    assert got["losses"] == pytest.approx(single["losses"], rel=RTOL, abs=ATOL)
    assert got["grad_norms"] == pytest.approx(single["grad_norms"], rel=RTOL, abs=ATOL)
    _assert_same_moe(got["moe"], single["moe"])
    assert any(stats["dropped"] > 0 for step in single["moe"] for stats in step.values())


# Under tensor parallelism each rank applies the capacity to its own tokens (as Megatron-core
# does), so drops can differ from one process's: this layout runs dropless, with image
# placeholders passed through (the MoE skips them; the kept tokens differ per TP rank).
DROPLESS = [f"train.steps={STEPS}", "train.log_interval=1", "data.seq_length=128",
            "train.micro_batch_size=2", "train.global_batch_size=8",
            "model.decoder.moe.masked_tokens=pass_through"]


def test_sequence_parallel_mixture_matches_single_process(tmp_path):
    single = _run(train_cmd(1, DROPLESS, tmp_path / "one", CONFIG), tmp_path / "one.json",
                  "single-process MM1 mixture baseline, dropless, pass-through")
    got = _run(train_cmd(2, [*DROPLESS, "parallel.tensor_parallel=2",
                             "parallel.sequence_parallel=true"], tmp_path / "run", CONFIG),
               tmp_path / "result.json", "2 ranks TP2 + sequence parallelism")
    assert got["losses"] == pytest.approx(single["losses"], rel=RTOL, abs=ATOL)
    assert got["grad_norms"] == pytest.approx(single["grad_norms"], rel=RTOL, abs=ATOL)
    _assert_same_moe(got["moe"], single["moe"])
