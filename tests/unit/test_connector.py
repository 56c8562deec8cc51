"""Connectors: shapes, parameter counts against `mm1_moe.info`'s formula (tiny and ViT-H into a
4096-wide decoder), the C-Abstractor's pooling against explicit overlapping windows, and one
RegNet bottleneck against a functional re-statement of timm's block."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from mm1_moe.config import ConnectorConfig, VisionConfig
from mm1_moe.info import connector_params
from mm1_moe.models.connector import Bottleneck, CAbstractor, build_connector

TYPES = ["c_abstractor", "avg_pool", "attn_pool"]


def _window_means(x_CGG: torch.Tensor, out: int) -> torch.Tensor:
    """Adaptive average pooling written out: output cell i spans input rows
    floor(i G / out) .. ceil((i + 1) G / out) - 1 (windows overlap when out does not divide G)."""
    G = x_CGG.shape[-1]
    bounds = [(i * G // out, -(-(i + 1) * G // out)) for i in range(out)]
    rows = [torch.stack([x_CGG[:, r0:r1, c0:c1].mean((1, 2)) for c0, c1 in bounds], -1)
            for r0, r1 in bounds]
    return torch.stack(rows, -2)


@pytest.mark.parametrize("out", [12, 8])
def test_pooling_matches_overlapping_windows_on_27x27(out):
    bounds = [(i * 27 // out, -(-(i + 1) * 27 // out)) for i in range(out)]
    assert any(b[0] < a[1] for a, b in zip(bounds, bounds[1:])), "windows should overlap"
    con = CAbstractor(vision_width=6, hidden=5, depth=1, num_tokens=out * out, d=7,
                      num_patches=27 * 27).double()
    seen = {}
    con.sampler.register_forward_hook(lambda m, args, y: seen.update(x=args[0], y=y))
    con(torch.randn(2, 27 * 27, 6, dtype=torch.float64))
    x, y = seen["x"], seen["y"]
    assert y.shape == (2, 5, out, out)
    assert torch.equal(y, torch.nn.AdaptiveAvgPool2d(out)(x))
    expected = torch.stack([_window_means(img, out) for img in x])
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("num_tokens", [144, 64])
@pytest.mark.parametrize("kind", TYPES)
def test_shapes_from_a_27x27_grid(kind, num_tokens):
    cfg = ConnectorConfig(type=kind, hidden_size=12, depth=2, num_tokens=num_tokens)
    con = build_connector(cfg, 16, 24, num_patches=729, num_heads=2)
    x = torch.randn(3, 729, 16, requires_grad=True)
    y = con(x)
    assert y.shape == (3, num_tokens, 24)
    y.square().mean().backward()
    assert x.grad is not None and all(p.grad is not None for p in con.parameters())


SIZES = {  # (vision, connector, decoder width): what each row exercises
    "tiny_configs_dense": (VisionConfig(image_size=56, patch_size=14, width=32, depth=2, num_heads=2, mlp_dim=64),
                           ConnectorConfig(hidden_size=32, depth=1, num_tokens=4), 64),
    "odd_widths_depth3_squeeze_rounding": (VisionConfig(image_size=70, patch_size=14, width=30, num_heads=2),
                                           ConnectorConfig(hidden_size=22, depth=3, num_tokens=9), 40),
    "vit_h_378_into_4096": (VisionConfig(), ConnectorConfig(hidden_size=1024, depth=3, num_tokens=144), 4096),
}


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("case", SIZES.values(), ids=SIZES.keys())
def test_parameter_count_matches_info_formula(case, kind):
    vis, con, d = case
    con = dataclasses.replace(con, type=kind)
    with torch.device("meta"):  # ViT-H -> 4096 is ~40M parameters: no memory needed to count
        module = build_connector(con, vis.width, d, num_patches=vis.num_patches, num_heads=vis.num_heads)
    assert sum(p.numel() for p in module.parameters()) == connector_params(con, vis, d)


def test_vit_h_c_abstractor_is_about_40m():
    vis, con, d = SIZES["vit_h_378_into_4096"]
    assert 38e6 < connector_params(con, vis, d) < 42e6  # MM1.md: "about 40M"


def _ln2d(x, norm):
    return F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), norm.weight, norm.bias, 1e-6).permute(0, 3, 1, 2)


def test_bottleneck_matches_timm_regnet_block_order():
    """timm regnet.Bottleneck(bottle_ratio=1, group_size=1, se_ratio=0.25, act=SiLU,
    norm=LayerNorm2d), restated with functional ops over the module's own weights."""
    torch.manual_seed(0)
    block = Bottleneck(6, 10).double()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    h = F.silu(_ln2d(F.conv2d(x, block.conv1.conv.weight), block.conv1.norm))
    h = F.silu(_ln2d(F.conv2d(h, block.conv2.conv.weight, padding=1, groups=10), block.conv2.norm))
    assert block.se.fc1.out_channels == round(6 * 0.25)  # SE width from the block *input*
    s = F.conv2d(F.silu(F.conv2d(h.mean((2, 3), keepdim=True), block.se.fc1.weight, block.se.fc1.bias)),
                 block.se.fc2.weight, block.se.fc2.bias)
    h = _ln2d(F.conv2d(h * torch.sigmoid(s), block.conv3.conv.weight), block.conv3.norm)
    shortcut = _ln2d(F.conv2d(x, block.downsample.conv.weight), block.downsample.norm)
    torch.testing.assert_close(block(x), F.silu(h + shortcut), rtol=1e-12, atol=1e-12)
    for conv in (block.conv1.conv, block.conv2.conv, block.conv3.conv, block.downsample.conv):
        assert conv.bias is None  # convs have no bias; the SE's 1x1 convs do


def test_bad_shapes_are_named():
    con = build_connector(ConnectorConfig(hidden_size=8, depth=1, num_tokens=4), 8, 8, num_patches=16)
    with pytest.raises(ValueError, match="built for 16 patches per image, got 25"):
        con(torch.randn(1, 25, 8))
    with pytest.raises(ValueError, match=r"num_tokens \(10\) is not a square"):
        build_connector(ConnectorConfig(type="avg_pool", num_tokens=10), 8, 8, num_patches=16)
    with pytest.raises(ValueError, match="model.connector.type"):
        build_connector(ConnectorConfig(type="mlp"), 8, 8, num_patches=16)
