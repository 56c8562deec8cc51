"""Upcycling on the training ranks (``torchrun ... mm1_moe.cli upcycle``): each rank converts its
own part of the MoE layout, and the checkpoint is bit-identical, tensor by tensor, to the one the
single-process path writes from the same dense checkpoint. Three layout pairs (the dense run's ->
the MoE config's): TP2 -> TP1 x EP2 in bf16, PP2 -> PP2 x EP2 with Drop-Upcycling (its subsets
are layout-independent), TP1 -> TP2 x EP2 with sequence parallelism and granularity 2. The
distributed function check (last pipeline stage, every rank's vocabulary slice) passes in each.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from _launch import REPO, TIMEOUT_S, _env

pytestmark = pytest.mark.distributed

DENSE = REPO / "configs" / "tiny-dense.yaml"
MOE = REPO / "configs" / "tiny-moe.yaml"
GRANULAR = ["model.decoder.moe.num_experts=8", "model.decoder.moe.top_k=4",
            "model.decoder.moe.expert_ffn_hidden_size=64"]


def _launch(nproc: int, argv, what: str) -> None:
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    proc = subprocess.run([*launcher, "-m", "mm1_moe.cli", *argv], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{what}\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """``dense(layout)``: the tiny dense model trained 2 steps in that layout (run folder)."""
    runs = {}

    def get(layout: str):
        if layout not in runs:
            out = tmp_path_factory.mktemp(f"dense-{layout}")
            parallel = {"tp1": [], "tp2": ["parallel.tensor_parallel=2"],
                        "pp2": ["parallel.pipeline_parallel=2"]}[layout]
            _launch(1 if layout == "tp1" else 2,
                    ["train", "--config", str(DENSE), f"train.output_dir={out}", "train.steps=2",
                     *parallel], f"dense run {layout}")
            runs[layout] = out
        return runs[layout]

    return get


def _moe_state(checkpoint: str, overrides):
    """Every tensor of an MoE checkpoint, read into one process (global names)."""
    from mm1_moe.config import load_config
    from mm1_moe.models.builder import build_model_chunks
    from mm1_moe.runtime import initialize, shutdown
    from mm1_moe.upcycle.source import (global_state_dict, load_source_, resolve_source,
                                        single_process_config)

    config = load_config(str(MOE), list(overrides))
    work = single_process_config(config, config.train.dtype)
    runtime = initialize(work)
    try:
        chunks = build_model_chunks(work, on_cpu=runtime.cpu_compat)
        load_source_(chunks, resolve_source(checkpoint), work)
        return global_state_dict(chunks)
    finally:
        shutdown()


PAIRS = [
    pytest.param("tp2", 2, ["train.dtype=bf16", "parallel.expert_parallel=2"], [],
                 id="dense-tp2-to-ep2-bf16"),
    pytest.param("pp2", 4, ["parallel.pipeline_parallel=2", "parallel.expert_parallel=2"],
                 ["--drop-ratio", "0.5"], id="dense-pp2-to-pp2xep2-drop-upcycling"),
    pytest.param("tp1", 4, ["parallel.tensor_parallel=2", "parallel.expert_parallel=2",
                            "parallel.sequence_parallel=true", *GRANULAR],
                 ["--granularity", "2", "--router-init", "random"],
                 id="dense-tp1-to-tp2xep2-sp-granular"),
]


@pytest.mark.parametrize("dense_layout, nproc, overrides, options", PAIRS)
def test_ranks_write_the_one_process_checkpoint(dense, tmp_path, dense_layout, nproc,
                                                overrides, options):
    source = str(dense(dense_layout))
    common = ["upcycle", "--from", source, "--config", str(MOE), *options]
    if "--router-init" in options:
        overrides = [*overrides, "model.decoder.moe.normalize_topk=true"]
    _launch(1, [*common, "--out", str(tmp_path / "one"), *overrides], "one-process upcycle")
    _launch(nproc, [*common, "--out", str(tmp_path / "ranks"), *overrides],
            f"upcycle on {nproc} ranks")
    report = json.loads((tmp_path / "ranks" / "upcycle.json").read_text())
    assert report["ranks"] == nproc and report["verified"] and report["ok"], report
    assert len(report["peak_rss_mib"]) == nproc
    if "--drop-ratio" in options:
        assert not report["exact_expected"] and report["max_abs_diff"] > 1e-3
    else:
        assert report["preserved"], report
    step = "checkpoints/step_00000000"
    one = _moe_state(str(tmp_path / "one" / step), overrides)
    ranks = _moe_state(str(tmp_path / "ranks" / step), overrides)
    assert one.keys() == ranks.keys() and len(one) > 20
    differ = [name for name in one if not torch.equal(one[name], ranks[name])]
    assert not differ, f"tensors that differ from the one-process upcycle: {differ}"


def test_hugging_face_shards_upcycle_on_ranks_reading_only_their_layers(tmp_path):
    """A sharded Hugging Face Llama folder upcycled on PP=2 ranks: the one-process checkpoint
    bit for bit, and each rank reads only the tensors of its own stage (one at a time)."""
    transformers = pytest.importorskip("transformers")
    from mm1_moe.config import load_config
    from mm1_moe.interop import llama_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(load_config(str(MOE))))
    folder = tmp_path / "llama"
    model.save_pretrained(folder, max_shard_size="100KB")
    total = len(model.state_dict())
    overrides = ["parallel.pipeline_parallel=2"]
    common = ["upcycle", "--from", str(folder), "--config", str(MOE)]
    _launch(1, [*common, "--out", str(tmp_path / "one"), *overrides], "one-process upcycle")
    _launch(2, [*common, "--out", str(tmp_path / "ranks"), *overrides], "upcycle on 2 ranks")
    report = json.loads((tmp_path / "ranks" / "upcycle.json").read_text())
    assert report["preserved"], report
    read = report["source_tensors_read"]
    # two of the four layers (9 tensors each) per stage, plus embedding / final norm and head
    assert all(n < total for n in read) and sum(read) == total, (read, total)
    step = "checkpoints/step_00000000"
    one = _moe_state(str(tmp_path / "one" / step), overrides)
    ranks = _moe_state(str(tmp_path / "ranks" / step), overrides)
    differ = [name for name in one if not torch.equal(one[name], ranks[name])]
    assert one.keys() == ranks.keys() and not differ, differ
