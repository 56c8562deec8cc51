"""The static kernel report on sm90 (``mm1-moe kernels report``, kernels/report.py): every kernel
launch of the MoE layer (both dispatcher paths), the RMSNorm and the attentions (decoder Dh=128
causal with documents, ViT Dh=80 bidirectional), forward and backward, at the real shapes of
mm1-7b-moe and mm1-3b-moe, compiled for sm90 without a GPU.

Budgets, per launch:
  spills         0 bytes of spill stores per thread (ptxas -v), except KNOWN_DEFECTS below;
  shared memory  at most the sm90 per-block limit (232,448 B, kernels/_common.py);
  tl.dot         every one lowers to wgmma (no mma.sync, no FMA loop) on sm90.

The same budgets hold for every GPU tile candidate of every op (kernels/tile_candidates.py: the
tiles benchmarks/bench_tile_sweep.py times to pin the tables), compiled at one representative
shape each: mm1-7b-moe's MoE shapes and its decoder attention (Dh=128, causal, documents).

CPU-only: the launches are captured on meta tensors and compiled in child processes (47
distinct specializations for the two configs, about 50 s on 2 cores; the candidates add about
30 more, mostly attention, about 30 s).
"""

from pathlib import Path

import pytest

from mm1_moe.config import load_config
from mm1_moe.kernel_shapes import kernel_shapes
from mm1_moe.kernels._common import SHARED_MEMORY_LIMIT
from mm1_moe.kernels.report import kernel_report, occupancy

REPO = Path(__file__).resolve().parents[2]
CONFIGS = ("mm1-7b-moe", "mm1-3b-moe")
SPILL_BUDGET = 0  # bytes of spill stores per thread

# Launches allowed to spill on sm90, keyed (stage, kernel) -> spill stores measured (bytes per
# thread). Empty since the tile fixes of issue 19: fc1 + SwiGLU forward spilled 16 B at
# 128x128 per accumulator, fc2 + SwiGLU backward 812-1,284 B at 128x128, attention dK/dV
# 1.6-1.8 KB and dQ 68 B at 4 warps. A new entry is a defect on record: when its tiles are
# fixed, test_known_defects_still_spill fails until it is removed (a strict xfail).
KNOWN_DEFECTS: dict = {}


# What the capture must find for each config (the names of the kernels' Python functions).
EXPECTED_KERNELS = {
    "_router_fwd_kernel", "_router_bwd_kernel", "_route_count_kernel", "_route_prefix_kernel",
    "_route_scatter_kernel", "_dispatch_fwd_kernel", "_dispatch_bwd_kernel",
    "_swiglu_fc1_kernel", "_grouped_mm_kernel", "_swiglu_fc2_bwd_kernel",
    "_grouped_mm_dw_kernel", "_gather_bwd_kernel", "_rms_norm_fwd_kernel",
    "_rms_norm_bwd_kernel", "_attn_fwd_kernel", "_attn_bwd_preprocess_kernel",
    "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
}


@pytest.fixture(scope="module")
def reports():
    shapes = [kernel_shapes(load_config(str(REPO / "configs" / f"{name}.yaml")))
              for name in CONFIGS]
    return dict(zip(CONFIGS, kernel_report(shapes, "sm90")))


def _rows(reports):
    return [(name, row) for name, rows in reports.items() for row in rows]


def _where(name, row) -> str:
    la = row.launch
    return f"{name} {la.stage} {la.kernel} grid {la.grid} {la.tensors}"


def test_shapes_are_the_configs():
    shapes = kernel_shapes(load_config(str(REPO / "configs" / "mm1-7b-moe.yaml")))
    moe = shapes["moe"]
    assert (moe["tokens"], moe["hidden"], moe["ffn"], moe["experts"], moe["top_k"]) == \
        (4096, 4096, 12288, 32, 2)
    decoder, vit = shapes["attention"]
    assert (decoder["batch"], decoder["seq"], decoder["heads"], decoder["head_dim"],
            decoder["causal"]) == (1, 4096, 32, 128, True)
    assert (vit["seq"], vit["heads"], vit["head_dim"], vit["causal"]) == (730, 16, 80, False)


def test_every_kernel_is_captured_and_compiles(reports):
    for name, rows in reports.items():
        assert {row.launch.kernel for row in rows} >= EXPECTED_KERNELS, name
        # every stage ran forward and backward
        stages = {row.launch.stage for row in rows}
        assert {"moe ep=1 fwd", "moe ep=1 bwd", "moe ep=8 fwd", "moe ep=8 bwd", "rmsnorm fwd",
                "rmsnorm bwd", "attention decoder Dh=128 fwd", "attention decoder Dh=128 bwd",
                "attention vit Dh=80 fwd", "attention vit Dh=80 bwd"} <= stages, name
    failed = [f"{_where(n, r)}: {r.error}" for n, r in _rows(reports) if r.error]
    assert not failed, "\n".join(failed)


def test_spills_within_budget(reports):
    over = [f"{_where(n, r)}: {r.stats['spill_stores']} B spilled, {r.stats['registers']} regs"
            for n, r in _rows(reports) if r.stats
            and (r.launch.stage, r.launch.kernel) not in KNOWN_DEFECTS
            and r.stats["spill_stores"] > SPILL_BUDGET]
    assert not over, f"spill stores over {SPILL_BUDGET} B per thread:\n" + "\n".join(over)


def test_known_defects_still_spill(reports):
    seen = {}
    for _, row in _rows(reports):
        key = (row.launch.stage, row.launch.kernel)
        if key in KNOWN_DEFECTS and row.stats:
            seen[key] = max(seen.get(key, 0), row.stats["spill_stores"])
    fixed = [f"{key}: measured {KNOWN_DEFECTS[key]} B, now {seen.get(key)}"
             for key in KNOWN_DEFECTS if seen.get(key, 0) <= SPILL_BUDGET]
    assert not fixed, ("known defects that no longer spill (or no longer run): remove them "
                       "from KNOWN_DEFECTS:\n" + "\n".join(fixed))


def test_shared_memory_within_limit(reports):
    limit = SHARED_MEMORY_LIMIT[90]
    over = [f"{_where(n, r)}: {r.stats['shared']} B" for n, r in _rows(reports)
            if r.stats and r.stats["shared"] > limit]
    assert not over, f"shared memory over the sm90 limit ({limit} B):\n" + "\n".join(over)


def test_every_dot_lowers_to_wgmma(reports):
    bad = [f"{_where(n, r)}: {r.stats['dots']} dots, {r.stats['mma']}" for n, r in _rows(reports)
           if r.stats and r.stats["dots"] and (r.stats["other_dots"] or not r.stats["wgmma_dots"])]
    assert not bad, "tl.dot not lowered to wgmma on sm90:\n" + "\n".join(bad)
    assert any(r.stats and r.stats["wgmma_dots"] for _, r in _rows(reports))  # the check sees


# ----------------------------------------------------------------------------- tile candidates


@pytest.fixture(scope="module")
def candidates():
    shapes = kernel_shapes(load_config(str(REPO / "configs" / "mm1-7b-moe.yaml")))
    shapes["attention"] = [a for a in shapes["attention"] if a["name"] == "decoder"]
    return shapes, kernel_report([shapes], "sm90", candidates=True)[0]


def test_every_candidate_is_captured_and_compiles(candidates):
    from mm1_moe.kernels.tile_candidates import problems

    shapes, rows = candidates
    kernels_by_stage: dict = {}
    for row in rows:
        kernels_by_stage.setdefault(row.launch.stage, set()).add(row.launch.kernel)
    names = set()
    for op, dims in problems(shapes):
        names.add(op.name)
        for tile in op.candidates(dims):
            stage = f"tiles {op.name} {op.key(dims)} | {op.label(tile)}"
            assert kernels_by_stage.get(stage, set()) >= set(op.kernels), stage
    assert names == {"dispatch_fwd", "dispatch_fwd_dot", "dispatch_bwd", "grouped_mm",
                     "grouped_mm_dw", "swiglu_fc1", "swiglu_fc2_bwd", "attention_fwd",
                     "attention_bwd"}
    failed = [f"{_where('candidates', r)}: {r.error}" for r in rows if r.error]
    assert not failed, "\n".join(failed)


def test_candidates_within_budgets(candidates):
    """No spill, shared memory within the sm90 limit, every dot on wgmma: for each candidate."""
    _, rows = candidates
    limit = SHARED_MEMORY_LIMIT[90]
    bad = [f"{r.launch.stage} {r.launch.kernel}: {r.stats['spill_stores']} B spilled, "
           f"{r.stats['shared']} B smem, {r.stats['mma']}" for r in rows if r.stats and (
               r.stats["spill_stores"] > SPILL_BUDGET or r.stats["shared"] > limit
               or (r.stats["dots"] and (r.stats["other_dots"] or not r.stats["wgmma_dots"])))]
    assert not bad, "candidates over budget:\n" + "\n".join(bad)


def test_shared_schedule_candidates_keep_block_m():
    """fc1, fc2 and fc2's backward (and dA) share one tile schedule (SwiGLUExpertsFunction):
    any candidate pinned as a table entry must keep the tables' BLOCK_M."""
    from mm1_moe.kernels import experts as ex, grouped_gemm as gg

    tables = {ex.FC1_GPU_BLOCKS.block_m, ex.FC2_BWD_GPU_BLOCKS.block_m, gg.GPU_BLOCKS.block_m}
    assert len(tables) == 1
    for b in ex.FC1_GPU_CANDIDATES + ex.FC2_BWD_GPU_CANDIDATES + gg.GPU_CANDIDATES:
        assert b.block_m in tables, b


@pytest.mark.parametrize("regs, shared, warps, cap, ctas, limit", [
    (255, 0, 8, 90, 1, "registers"),          # 256 regs x 32 threads x 8 warps = the whole file
    (128, 0, 4, 90, 4, "registers"),
    (24, 0, 4, 90, 16, "warps"),              # 64 warps per SM
    (64, 120 * 1024, 4, 90, 1, "shared"),     # 2 x (120 + 1) KiB > 228 KiB
    (64, 80 * 1024, 4, 80, 2, "shared"),      # sm80: 164 KiB per SM
    (16, 0, 1, 90, 32, "ctas"),
])
def test_occupancy(regs, shared, warps, cap, ctas, limit):
    occ = occupancy(regs, shared, warps, cap)
    assert (occ["ctas_per_sm"], occ["limited_by"]) == (ctas, limit)
    assert occ["warps_per_sm"] == ctas * warps


def test_bad_target():
    with pytest.raises(ValueError, match="sm90"):
        kernel_report([{}], "sm70")
