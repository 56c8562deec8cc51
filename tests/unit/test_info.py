"""Parameter counts, FLOPs and memory estimates of ``mm1_moe.info`` against hand arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mm1_moe.config import ConnectorConfig, VisionConfig, load_config
from mm1_moe.info import (
    connector_params,
    decoder_flops_per_token,
    family_table,
    format_report,
    info_report,
    memory_per_gpu,
    param_counts,
    vision_params,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FAMILY = ["mm1-3b", "mm1-7b", "mm1-30b", "mm1-3b-moe", "mm1-7b-moe"]


def _load(name: str):
    return load_config(str(CONFIGS / f"{name}.yaml"))


# Tiny configs: D=64, 4 heads of 16, 2 KV heads, FFN 128, vocab 256 (already a multiple of 128),
# 4 layers; ViT width 32, depth 2, MLP 64, 56 px / 14 = 16 patches; C-Abstractor 32 wide, depth 1.
TINY_ATTN = 2 * 64 + 64 * 64 + 2 * (64 * 32) + 64 * 64  # norms, Q, K+V, O = 12416
TINY_FFN = 3 * 64 * 128  # SwiGLU = 24576
TINY_EMBED = 256 * 64  # one of input embedding / output layer
TINY_VISION = (
    3 * 14 * 14 * 32 + 32 + 17 * 32 + 2 * 32  # patch conv, CLS, 16+1 positions, pre-LN
    + 2 * (4 * 32 + 4 * (32 * 32 + 32) + (32 * 64 + 64) + (64 * 32 + 32))  # 2 layers
)
TINY_BLOCK = (32 * 32 + 64) + (9 * 32 + 64) + (32 * 8 + 8) + (8 * 32 + 32) + (32 * 32 + 64)
TINY_CONNECTOR = 16 * 32 + 2 * TINY_BLOCK + (32 * 64 + 64) + (64 * 64 + 64)


def test_tiny_dense_hand_count() -> None:
    p = param_counts(_load("tiny-dense"))
    assert p.vision == TINY_VISION == 36544
    assert p.connector == TINY_CONNECTOR == 12944
    assert p.decoder_dense == 4 * (TINY_ATTN + TINY_FFN) + 2 * TINY_EMBED + 64 == 180800
    assert p.experts == p.routers == 0
    assert p.total == p.active == TINY_VISION + TINY_CONNECTOR + 180800


def test_tiny_moe_hand_count() -> None:
    p = param_counts(_load("tiny-moe"))  # layers 1 and 3 are MoE with 4 experts, top-2
    assert p.experts == 2 * 4 * TINY_FFN == 196608
    assert p.routers == 2 * 64 * 4
    assert p.decoder_dense == 4 * TINY_ATTN + 2 * TINY_FFN + 2 * TINY_EMBED + 64
    assert p.total == TINY_VISION + TINY_CONNECTOR + p.decoder_dense + p.experts + p.routers
    assert p.active == p.total - 2 * 2 * TINY_FFN  # 2 of 4 experts idle in each MoE layer


def test_tiny_flops_hand_count() -> None:
    # matmuls: 4 x (Q 4096 + K,V 4096 + O 4096 + FFN 24576) + output layer 16384; attention
    # 2 x 2 x 4 layers x 64 tokens x 64 / 2 (causal).
    dense = decoder_flops_per_token(_load("tiny-dense"))
    assert dense["forward"] == 2 * (4 * (3 * 4096 + 24576) + 16384) + 2 * 2 * 4 * 64 * 64 / 2
    assert dense["training"] == 3 * dense["forward"]
    moe = decoder_flops_per_token(_load("tiny-moe"))
    active = 4 * 3 * 4096 + 2 * 24576 + 2 * 2 * 24576 + 2 * 256 + 16384
    assert moe["forward"] == 2 * active + 2 * 2 * 4 * 64 * 64 / 2


@pytest.mark.parametrize("name,published", [("mm1-3b-moe", 64e9), ("mm1-7b-moe", 47e9)])
def test_moe_family_totals(name: str, published: float) -> None:
    p = param_counts(_load(name))
    print(f"{name}: total {p.total / 1e9:.2f}B, active {p.active / 1e9:.2f}B")
    assert abs(p.total - published) / published < 0.10
    assert p.active < p.total / 4


def test_moe_3b_active_near_4_5b() -> None:
    assert 4.0e9 < param_counts(_load("mm1-3b-moe")).active < 5.0e9


@pytest.mark.parametrize("name,size", [("mm1-3b", 3e9), ("mm1-7b", 7e9), ("mm1-30b", 30e9)])
def test_dense_family_decoders(name: str, size: float) -> None:
    p = param_counts(_load(name))
    decoder = p.decoder_dense + p.experts + p.routers
    print(f"{name}: decoder {decoder / 1e9:.2f}B, decoder+vision "
          f"{(decoder + p.vision) / 1e9:.2f}B, total {p.total / 1e9:.2f}B")
    assert abs(decoder - size) / size < 0.15
    assert p.active == p.total


def test_c_abstractor_vit_h_into_4096() -> None:
    n = connector_params(ConnectorConfig(hidden_size=1024, depth=3, num_tokens=144),
                         VisionConfig(width=1280), 4096)
    first = (1280 * 1024 + 2048) + (9 * 1024 + 2048) + (1024 * 320 + 320) + (320 * 1024 + 1024) \
        + (1024 * 1024 + 2048) + (1280 * 1024 + 2048)
    rest = (1024 * 1024 + 2048) + (9 * 1024 + 2048) + (1024 * 256 + 256) + (256 * 1024 + 1024) \
        + (1024 * 1024 + 2048)
    readout = (1024 * 4096 + 4096) + (4096 * 4096 + 4096)
    assert n == 729 * 1280 + first + 5 * rest + readout
    assert 35e6 < n < 45e6


def test_other_connectors() -> None:
    vis = VisionConfig(width=32, image_size=56)
    readout = (32 * 64 + 64) + (64 * 64 + 64)
    assert connector_params(ConnectorConfig(type="avg_pool", num_tokens=4), vis, 64) == readout
    attn = 4 * 32 + 4 * (32 * 32 + 32) + 2 * 32 + readout
    assert connector_params(ConnectorConfig(type="attn_pool", num_tokens=4), vis, 64) == attn


def test_vision_matches_hf_clip() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        image_size=56, patch_size=14)
    model = transformers.CLIPVisionModel(cfg)
    # CLIP's post_layernorm normalises only the pooled CLS output, which MM1 never reads
    post_ln = sum(p.numel() for n, p in model.named_parameters() if "post_layernorm" in n)
    expected = sum(p.numel() for p in model.parameters()) - post_ln
    vis = VisionConfig(image_size=56, patch_size=14, width=32, depth=2, num_heads=2, mlp_dim=64)
    assert vision_params(vis) == expected == TINY_VISION


def test_memory_dp_halves_optimizer() -> None:
    for name, ep in (("mm1-7b", 1), ("tiny-moe", 1), ("mm1-3b-moe", 8)):
        cfg = _load(name)
        one = memory_per_gpu(cfg, tp=1, pp=1, ep=ep, dp=8)
        two = memory_per_gpu(cfg, tp=1, pp=1, ep=ep, dp=16)
        assert two.optimizer == pytest.approx(one.optimizer / 2, rel=1e-6)
        assert two.weights == one.weights and two.grads == one.grads


def test_memory_bf16_grad_buffers_halve_grads() -> None:
    """train.grad_reduce_in_fp32=false: 2-byte gradient buffers in a bf16 run; fp32 runs keep 4."""
    cfg = _load("mm1-7b")
    fp32_grads = memory_per_gpu(cfg, tp=1, pp=1, dp=8)
    cfg.train.grad_reduce_in_fp32 = False
    bf16_grads = memory_per_gpu(cfg, tp=1, pp=1, dp=8)
    assert bf16_grads.grads * 2 == fp32_grads.grads
    assert bf16_grads.weights == fp32_grads.weights
    cfg.train.dtype = "fp32"
    assert memory_per_gpu(cfg, tp=1, pp=1, dp=8).grads == fp32_grads.grads


def test_memory_tp_halves_weights() -> None:
    cfg = _load("mm1-7b")
    one, two = memory_per_gpu(cfg, tp=1, pp=1, dp=1), memory_per_gpu(cfg, tp=2, pp=1, dp=1)
    assert 0.45 < two.weights / one.weights < 0.55
    assert one.weights == pytest.approx(2 * param_counts(cfg).total, rel=1e-6)  # bf16
    assert memory_per_gpu(cfg, tp=2, pp=1, world_size=16) == memory_per_gpu(cfg, 2, 1, dp=8)


def test_memory_ep_splits_experts() -> None:
    cfg = _load("mm1-3b-moe")
    p = param_counts(cfg)
    one, eight = memory_per_gpu(cfg, 1, 1, 1, 8), memory_per_gpu(cfg, 1, 1, 8, 8)
    assert one.weights - eight.weights == pytest.approx(2 * p.experts * 7 / 8, rel=1e-6)


def test_report_keys_and_format() -> None:
    report = info_report(_load("mm1-7b-moe"), dp=8)
    report = json.loads(json.dumps(report))
    for key in ("total_params", "active_params", "params", "flops_per_token",
                "memory_per_gpu_bytes", "layout"):
        assert key in report
    assert set(report["params"]) >= {"vision", "connector", "decoder", "experts", "routers"}
    assert sum(report["params"].values()) == report["total_params"]
    assert set(report["flops_per_token"]) >= {"training", "forward"}
    mem = report["memory_per_gpu_bytes"]
    assert set(mem) >= {"weights", "grads", "optimizer", "activations", "total"}
    assert report["layout"]["tp"] == 2 and report["layout"]["ep"] == 8
    assert report["layout"]["dp"] == 8
    text = format_report(report)
    print(text)
    assert "45.36B" in text and "GiB" in text


def test_family_table() -> None:
    table = family_table([(n, _load(n)) for n in FAMILY])
    print(table)
    lines = table.splitlines()
    assert len(lines) == 2 + len(FAMILY)
    assert "training GFLOPs/token" in lines[0]
    assert "64 (every 2nd, top-2)" in table and "56 (8)" in table


@pytest.mark.parametrize("override, message", [
    # before validation covered them: width 0 counted a 256-parameter ViT, width -1 a ViT of
    # -874 parameters, and depth -1 a negative number of layers; each exited 0
    ("model.vision.width=0", "model.vision.width (0) must be >= 1"),
    ("model.vision.width=-1", "model.vision.width (-1) must be >= 1"),
    ("model.vision.depth=-1", "model.vision.depth (-1) must be >= 1"),
    ("model.vision.mlp_dim=-1", "model.vision.mlp_dim (-1) must be >= 1"),
    ("model.connector.hidden_size=0", "model.connector.hidden_size (0) must be >= 1"),
    ("data.max_images_per_sequence=0", "data.max_images_per_sequence (0) must be >= 1"),
])
def test_info_refuses_a_size_below_its_range_by_its_dotted_path(override, message, capsys) -> None:
    from mm1_moe.cli import main

    assert main(["info", "--config", str(CONFIGS / "tiny-mm1-moe.yaml"), override]) == 2
    printed = capsys.readouterr()
    assert message in printed.err and printed.err.startswith("mm1-moe info: invalid config:")
    assert printed.out == ""  # no report with negative counts
