"""MM1 with images across pipeline stages: the encoder + connector stage and the decoder stage
together give the same loss and gradients as one process.

``run_mm1_pipeline.py`` runs one forward/backward step of the tiny MM1 (ViT + C-Abstractor +
dense decoder) on Megatron's schedule over two micro-batches with 0, 1 and 2 images per
sequence, from layout-invariant weights. The single-process run is the baseline; each layout
must reproduce its loss and every parameter's gradient norm (ViT, connector and decoder, keyed by
global name) to fp32 round-off. Measured on the 2-core CPU machine: PP=2 and PP=2 x VPP=2 match
bit for bit, TP=2 within 4e-7 relative.
"""

from __future__ import annotations

import sys

import pytest

from _launch import HERE, _run

pytestmark = pytest.mark.distributed

SCRIPT = HERE / "run_mm1_pipeline.py"
RTOL = 1e-5


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("mm1") / "pp1.json"
    return _run([sys.executable, str(SCRIPT)], out, "MM1 single-process baseline")


LAYOUTS = [
    pytest.param(["parallel.pipeline_parallel=2"], id="pp2-encoder-stage-plus-decoder-stage"),
    pytest.param(["parallel.pipeline_parallel=2", "parallel.virtual_pipeline=2"],
                 id="pp2-vpp2-interleaved"),
    pytest.param(["parallel.tensor_parallel=2"], id="tp2-vit-and-decoder-sharded"),
    # image rows spliced before the scatter to the sequence-parallel region; the norms' and
    # routers' partial grads summed over TP (their sequence_parallel attribute)
    pytest.param(["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"],
                 id="tp2-sequence-parallel"),
]


@pytest.mark.parametrize("overrides", LAYOUTS)
def test_layout_matches_single_process(overrides, baseline, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(SCRIPT), *overrides]
    got = _run(cmd, tmp_path / "result.json", f"MM1 2 ranks {' '.join(overrides)}")
    assert got["loss"] == pytest.approx(baseline["loss"], rel=RTOL)
    assert got["grad_norms"].keys() == baseline["grad_norms"].keys()
    for part in ("vision_model.", "connector.", "language_model."):
        assert any(k.startswith(part) and v > 0 for k, v in baseline["grad_norms"].items()), part
    mismatched = {k: (v, got["grad_norms"][k]) for k, v in baseline["grad_norms"].items()
                  if got["grad_norms"][k] != pytest.approx(v, rel=RTOL, abs=1e-9)}
    assert not mismatched, f"gradient norms (single process, layout): {mismatched}"
