"""Vision-language connectors: ViT patch features [I, P, W] -> image tokens [I, V, D].

Shapes: I images, P patches (a square grid G x G, 27 x 27 for ViT-H/14 at 378), W ViT width,
C connector hidden width, V image tokens per image (a square, g x g: 64 or 144), D decoder width.

* ``CAbstractor`` (MM1's choice, from Honeybee): + learned positions, RegNet stage W -> C at
  G x G, adaptive average pool to g x g, RegNet stage C -> C, MLP readout C -> D -> D.
* ``AvgPoolConnector``: adaptive average pool to g x g, then the same readout W -> D -> D.
* ``AttnPoolConnector``: V learned queries cross-attend to the (LayerNormed) patch features,
  then the readout W -> D -> D.

Plain torch modules (about 40M parameters for ViT-H into a 4096-wide decoder: replicated, not
tensor-parallel). Their parameters reach Megatron's ``sharded_state_dict`` through its default
for non-Megatron modules (replicated tensors), which layout-invariant init and checkpoints use.
Every parameter count equals ``mm1_moe.info.connector_params``.

Init: convs and linears keep torch's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights
and biases; norms start at ones and zeros; the learned positions and queries are N(0, 0.02)
(``LEARNED_STD``; each connector's ``param_init``). N(0, 0.02) for the convs and linears too
would shrink the image tokens (a 3x3 depthwise conv has fan-in 9, a 64-wide readout 64): on the
bundled captions at lr 1e-3 the tiny MM1 was slower to use the images (with images shuffled
across captions the loss rose 0.30 above the true pairing after 240 steps, 0.63 with torch's
default; measured before the biases followed torch's default too).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConnectorConfig
from .param_init import ParamInit, normal


LEARNED_STD = 0.02  # the learned positions (C-Abstractor) and queries (attention pooling)


def grid_side(n: int, what: str) -> int:
    """The side of a square grid of ``n`` cells; ValueError naming ``what`` otherwise."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{what} ({n}) is not a square: the connector needs a square grid")
    return side


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of [I, C, h, w] (timm's ``LayerNorm2d``, eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6, dtype: Optional[torch.dtype] = None):
        super().__init__(channels, eps=eps, dtype=dtype)

    def forward(self, x_ICHW: torch.Tensor) -> torch.Tensor:
        x_IHWC = x_ICHW.permute(0, 2, 3, 1)
        y = F.layer_norm(x_IHWC, self.normalized_shape, self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class ConvNorm(nn.Sequential):
    """Conv (no bias) + LayerNorm2d (+ SiLU when ``act``): timm's ``ConvNormAct``."""

    def __init__(self, c_in: int, c_out: int, kernel: int, groups: int = 1, act: bool = True,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, groups=groups, bias=False,
                              dtype=dtype)
        self.norm = LayerNorm2d(c_out, dtype=dtype)
        self.act = nn.SiLU() if act else nn.Identity()


class SqueezeExcite(nn.Module):
    """Channel gate: global mean -> 1x1 conv to ``rd`` -> SiLU -> 1x1 conv back -> sigmoid."""

    def __init__(self, channels: int, rd: int, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd, 1, dtype=dtype)
        self.act = nn.SiLU()
        self.fc2 = nn.Conv2d(rd, channels, 1, dtype=dtype)

    def forward(self, x_ICHW: torch.Tensor) -> torch.Tensor:
        s = self.fc2(self.act(self.fc1(x_ICHW.mean((2, 3), keepdim=True))))
        return x_ICHW * s.sigmoid()


class Bottleneck(nn.Module):
    """RegNet bottleneck (timm ``regnet.Bottleneck`` with bottle_ratio 1, group size 1, SE ratio
    0.25 of the block input): 1x1 ConvNorm+SiLU, depthwise 3x3 ConvNorm+SiLU, SE, 1x1 ConvNorm,
    + shortcut (1x1 ConvNorm when the widths differ), SiLU."""

    def __init__(self, c_in: int, c_out: int, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.conv1 = ConvNorm(c_in, c_out, 1, dtype=dtype)
        self.conv2 = ConvNorm(c_out, c_out, 3, groups=c_out, dtype=dtype)
        self.se = SqueezeExcite(c_out, int(round(c_in * 0.25)), dtype=dtype)
        self.conv3 = ConvNorm(c_out, c_out, 1, act=False, dtype=dtype)
        self.downsample = ConvNorm(c_in, c_out, 1, act=False, dtype=dtype) if c_in != c_out else nn.Identity()
        self.act3 = nn.SiLU()

    def forward(self, x_ICHW: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.se(self.conv2(self.conv1(x_ICHW))))
        return self.act3(y + self.downsample(x_ICHW))


def reg_stage(depth: int, c_in: int, c_out: int, dtype: Optional[torch.dtype] = None) -> nn.Sequential:
    return nn.Sequential(*[Bottleneck(c_in if i == 0 else c_out, c_out, dtype=dtype) for i in range(depth)])


def readout(c_in: int, d: int, dtype: Optional[torch.dtype] = None) -> nn.Sequential:
    """MLP readout: Linear(c_in -> D), SiLU, Linear(D -> D)."""
    return nn.Sequential(nn.Linear(c_in, d, dtype=dtype), nn.SiLU(), nn.Linear(d, d, dtype=dtype))


def _to_grid(x_IPW: torch.Tensor) -> torch.Tensor:
    """[I, P, W] -> [I, W, G, G]."""
    I, P, W = x_IPW.shape
    G = grid_side(P, "patches per image")
    return x_IPW.transpose(1, 2).reshape(I, W, G, G)


def _from_grid(x_ICgg: torch.Tensor) -> torch.Tensor:
    """[I, C, g, g] -> [I, g * g, C]."""
    return x_ICgg.flatten(2).transpose(1, 2)


class CAbstractor(nn.Module):
    """C-Abstractor (Honeybee; MM1's connector): [I, P, W] -> [I, V, D].

    The pooling is ``nn.AdaptiveAvgPool2d``: from 27 x 27 to 12 x 12 its windows (cell i spans
    rows floor(27 i / 12) .. ceil(27 (i + 1) / 12) - 1) overlap and differ in size, exactly as
    Honeybee's reference (which uses the same module)."""

    def __init__(self, vision_width: int, hidden: int, depth: int, num_tokens: int, d: int,
                 num_patches: int, dtype: Optional[torch.dtype] = None):
        super().__init__()
        grid_side(num_patches, "num_patches")
        g = grid_side(num_tokens, "num_tokens")
        self.pos_embed = nn.Parameter(torch.empty(num_patches, vision_width, dtype=dtype))
        self.param_init("pos_embed").init_(self.pos_embed)
        self.stage1 = reg_stage(depth, vision_width, hidden, dtype=dtype)
        self.sampler = nn.AdaptiveAvgPool2d((g, g))
        self.stage2 = reg_stage(depth, hidden, hidden, dtype=dtype)
        self.readout = readout(hidden, d, dtype=dtype)

    def param_init(self, name: str) -> ParamInit:
        return {"pos_embed": normal(LEARNED_STD)}[name]

    def forward(self, x_IPW: torch.Tensor) -> torch.Tensor:
        if x_IPW.shape[1] != self.pos_embed.shape[0]:
            raise ValueError(f"C-Abstractor built for {self.pos_embed.shape[0]} patches per image, "
                             f"got {x_IPW.shape[1]}")
        x = _to_grid(x_IPW + self.pos_embed)
        x = self.stage2(self.sampler(self.stage1(x)))
        return self.readout(_from_grid(x))


class AvgPoolConnector(nn.Module):
    """Adaptive average pooling of the patch grid to g x g, then the MLP readout W -> D -> D."""

    def __init__(self, vision_width: int, num_tokens: int, d: int,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        g = grid_side(num_tokens, "num_tokens")
        self.sampler = nn.AdaptiveAvgPool2d((g, g))
        self.readout = readout(vision_width, d, dtype=dtype)

    def forward(self, x_IPW: torch.Tensor) -> torch.Tensor:
        return self.readout(_from_grid(self.sampler(_to_grid(x_IPW))))


class AttnPoolConnector(nn.Module):
    """V learned queries cross-attend (``num_heads`` heads, biased q/k/v/o projections) to the
    LayerNormed patch features; then the MLP readout W -> D -> D."""

    def __init__(self, vision_width: int, num_tokens: int, d: int, num_heads: int,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        if vision_width % num_heads:
            raise ValueError(f"attention pooling: width {vision_width} is not divisible by "
                             f"{num_heads} heads")
        W, self.num_heads = vision_width, num_heads
        self.queries = nn.Parameter(torch.empty(num_tokens, W, dtype=dtype))
        self.param_init("queries").init_(self.queries)
        self.kv_norm = nn.LayerNorm(W, dtype=dtype)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(W, W, dtype=dtype) for _ in range(4))
        self.readout = readout(W, d, dtype=dtype)

    def param_init(self, name: str) -> ParamInit:
        return {"queries": normal(LEARNED_STD)}[name]

    def _heads(self, x_INW: torch.Tensor) -> torch.Tensor:
        I, N, W = x_INW.shape
        return x_INW.view(I, N, self.num_heads, W // self.num_heads).transpose(1, 2)

    def forward(self, x_IPW: torch.Tensor) -> torch.Tensor:
        I, _, W = x_IPW.shape
        kv = self.kv_norm(x_IPW)
        q = self._heads(self.q_proj(self.queries).expand(I, -1, -1))
        attn = F.scaled_dot_product_attention(q, self._heads(self.k_proj(kv)),
                                              self._heads(self.v_proj(kv)))
        out_IVW = self.o_proj(attn.transpose(1, 2).reshape(I, -1, W))
        return self.readout(out_IVW)


def build_connector(connector_cfg: ConnectorConfig, vision_width: int, decoder_hidden: int, *,
                    num_patches: int, num_heads: Optional[int] = None,
                    dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The connector ``connector_cfg.type`` names. ``num_patches`` (the ViT's P) sizes the
    C-Abstractor's position embedding; ``num_heads`` is attention pooling's head count (default:
    64-wide heads when the width allows, else one head)."""
    con = connector_cfg
    if con.type == "c_abstractor":
        return CAbstractor(vision_width, con.hidden_size, con.depth, con.num_tokens,
                           decoder_hidden, num_patches, dtype=dtype)
    if con.type == "avg_pool":
        return AvgPoolConnector(vision_width, con.num_tokens, decoder_hidden, dtype=dtype)
    if con.type == "attn_pool":
        heads = num_heads or (vision_width // 64 if vision_width % 64 == 0 else 1)
        return AttnPoolConnector(vision_width, con.num_tokens, decoder_hidden, heads, dtype=dtype)
    raise ValueError(f"model.connector.type ({con.type!r}) must be one of "
                     "'c_abstractor', 'avg_pool', 'attn_pool'")
