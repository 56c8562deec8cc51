"""Activation memory by formula: the bytes autograd saves for the backward, per decoder layer,
per MoE layer, for the ViT + connector and for the embedding and loss, for each
``train.recompute`` mode and ``train.dtype``. Pure Python (no torch).

``auto`` kernels are planned as a GPU runs them (ours). Every term below is a tensor our code
path saves, found by recording each save
(``mm1_moe.models.saved_memory.SavedBytes``) and checked against that measurement at
seq 1024-4096 with small widths (tests/unit/test_activation_memory.py, within 10%). Where the
two disagree, the formula is what changes. Sizes per token of the micro-batch (T = s*b tokens),
in bytes; p is the activation width (4 fp32, 2 bf16), fp32 statistics are 4 bytes whatever p.

Decoder layer (pre-norm, fused QKV + RoPE + flash-type attention, SwiGLU; D width, Hq/Hkv heads,
hd head dim, F FFN width, all per tensor-parallel rank where Megatron splits them):
  norm     ours (``kernels.norm=triton``): x (D p, the input's own storage) and 1/rms (4);
           torch's (on CPU): x in fp32 (4D), 1/rms (4) and x / rms in fp32 (4D). The linear
           after it saves the norm's output (D p).
  attention  the QKV projection's output (Hq + 2 Hkv) hd p (v is a view of it), q and k after
           RoPE (Hq + Hkv) hd p, RoPE's cos/sin for q and k (4 hd p per position, shared by the
           batch), the output o (Hq hd p; the output projection saves it as a strided view, so
           it counts once for any b), the softmax log-sum-exp (4 Hq).
           Flash-type attention (ours, SDPA's flash/efficient backends, flash-attn) keeps no
           s x s matrix; Megatron's ``local`` attention keeps the probabilities (fp32, and a
           bf16 copy in bf16 runs) unless selective recomputation reruns it.
  dense FFN  fc1's output 2F p (silu reads its gate half), silu's output F p, Megatron's
           ``x_linear + glu_linear_offset`` F p, fc2's input F p.
  MoE FFN  after the norm: the router's fp32 input (4D) and, in bf16, the experts' input (D p);
           router: logits 4E, log-sum-exp 4, ids and weights 8K; the sort index 8K; the experts'
           gather index and row scale 8K and the fc1 output K * 2F_e p (recomputed in the
           backward under selective). At TP > 1 each TP rank's experts take S/tp of the tokens
           (moe/sequence_parallel.py) while every rank routes all of them (gathered logits);
           without sequence parallelism the slices are views of the whole norm output, which
           stays kept (D p per token of the full sequence). EP > 1 (all-to-all) or ``fuse_dispatch=False``: the
           dispatched rows K D p replace the gather, and combine keeps the expert outputs K D p.
Recompute:
  selective  core attention reruns: its log-sum-exp is not kept (q, k, v are the checkpoint's
           inputs and the output projection keeps o); the experts' fc1 output is not kept.
  full     each group of ``recompute_num_layers`` layers keeps only its input (D p per token,
           the checkpoint's argument); the backward reruns one group at a time, so one group's
           no-recompute bytes come back at the peak (``recompute_peak``).
Sequence parallelism divides every per-token term by tp (Megatron keeps the scattered shards).
Embedding and loss: the token ids (8 per token) on the first stage; on the last, the final norm,
the output layer's input and the cross entropy's fp32 softmax over V/tp plus a mask and the
target (4 V/tp + 9).
ViT (CLIP pre-LN, width W, M MLP, H heads, n = P + 1 tokens per image, images as the batch):
  per layer: two LayerNorms (input p W + fp32 mean and rstd 8 + output p W), fused QKV output
  3W p, log-sum-exp 4H, o W p, MLP fc1 output and the activation's saves (quick_gelu: sigmoid
  and product, 3M p in all; gelu: 2M p). Plus the image (3 px^2 p), the pre-LayerNorm (W p + 8).
C-Abstractor (per image, P patches, V tokens, c hidden): each RegNet bottleneck at g positions
  keeps its input c_in and 9 c-wide maps (LayerNorm2d's channels-last copies, SiLU in/out, the SE
  product, conv3's input, the residual sum), fp32 LN statistics 8 per position for 3 (4 with
  the width-changing shortcut) LayerNorms, and the SE vectors; the pooling between the stages
  keeps its input (c P); the readout keeps c + 2D per token.
"""

from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Dict, Iterable, Optional

from .config.schema import AUTO_ON_GPU, Config

FP32 = 4


def _p(config: Config) -> int:
    return 2 if config.train.dtype == "bf16" else 4


@dataclass
class LayerBytes:
    """Bytes one layer keeps for backward over one micro-batch, split as the formula is."""

    norms: float
    attention: float
    ffn: float

    @property
    def total(self) -> float:
        return self.norms + self.attention + self.ffn


def planned_kernel(config: Config, kind: str) -> str:
    """``kernels.<kind>`` as a GPU runs it (``auto`` -> the GPU choice): the plan is per GPU."""
    name = getattr(config.kernels, kind)
    return AUTO_ON_GPU[kind] if name == "auto" else name


def norm_keep_bytes(config: Config) -> float:
    """Per token, what one RMSNorm keeps besides its output: our kernel x (D p, the input
    itself) and 1/rms (4); torch's composite x in fp32, 1/rms and x / rms in fp32 (8D + 4)."""
    D = config.model.decoder.hidden_size
    if planned_kernel(config, "norm") == "triton":
        return D * _p(config) + 4
    return 8 * D + 4


def _norm_keeps_its_input(config: Config) -> bool:
    """Whether the norm saves the layer input's own storage (not an fp32 copy of it)."""
    return planned_kernel(config, "norm") == "triton" or _p(config) == FP32


def decoder_layer_bytes(config: Config, moe_layer: bool, tp: int = 1, sp: bool = False,
                        ep: int = 1, recompute: Optional[str] = None,
                        fuse_dispatch: bool = True) -> LayerBytes:
    """What one decoder layer saves for one micro-batch with ``recompute`` none or selective
    (default: ``train.recompute``; full is a stage-level matter, see ``decoder_stage_bytes``)."""
    dec, p = config.model.decoder, _p(config)
    recompute = recompute or config.train.recompute
    selective = recompute == "selective"
    s, b = config.data.seq_length, config.train.micro_batch_size
    T = s * b
    seq_split = tp if sp else 1  # residual-level tensors: sharded over tp only with SP
    D, hd = dec.hidden_size, dec.head_dim
    hq, hkv = dec.num_attention_heads / tp, dec.kv_heads / tp
    norm_keep = norm_keep_bytes(config)
    norms = T * (norm_keep + D * p) / seq_split  # the input norm (its output feeds linear_qkv)
    attn = T * ((hq + 2 * hkv) * hd + (hq + hkv) * hd + hq * hd) * p
    attn += s * 4 * hd * p  # RoPE cos/sin per position for q and k
    if not selective:
        attn += T * 4 * hq
    if planned_kernel(config, "attention") == "local" and not selective:
        # Megatron's unfused softmax keeps s x s probabilities: fp32, plus the bf16 copy the
        # value matmul reads in bf16 (measured 4.2 and 6.2 bytes per head, query and key)
        attn += hq * s * T * (FP32 + (p if p != FP32 else 0))
    if not moe_layer:
        norms += T * (norm_keep + D * p) / seq_split
        ffn = T * 5 * (dec.ffn_hidden_size / tp) * p
        return LayerBytes(norms, attn, ffn)
    moe = dec.moe
    f_e, k, e = moe.expert_ffn_hidden_size or dec.ffn_hidden_size, moe.top_k, moe.num_experts
    tokens = T / tp  # tokens this rank's experts take: TP ranks split the sequence at the MoE
    norms += T * norm_keep / seq_split
    if sp or tp == 1:  # the router's fp32 input, and in bf16 the experts' input
        norms += tokens * (4 * D + (D * p if p != FP32 else 0))
    else:  # split at the MoE's input: the slices are views of the replicated norm output
        norms += T * D * p + (tokens * 4 * D if p != FP32 else 0)
    # router (every TP rank routes all tokens from the gathered logits): logits 4E, lse 4,
    # ids and weights 8K; then this rank's tokens: sort index, gather index and row scale
    ffn = T * (4 * e + 4 + 8 * k) + tokens * 16 * k
    if ep > 1 or not fuse_dispatch:
        ffn += tokens * 2 * k * D * p
    if not selective:
        ffn += tokens * k * 2 * f_e * p
    return LayerBytes(norms, attn, ffn)


def _per_group(layers: int, group: int) -> int:
    return max(1, layers // max(1, group))


@dataclass
class StageBytes:
    """Activation bytes of one micro-batch on one pipeline stage."""

    layers: float
    """Kept across the forward by the decoder layers (with full recompute: the group inputs)."""
    recompute_peak: float
    """Extra bytes while the backward reruns one group (full recompute), else 0."""
    embedding_and_loss: float

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)

    @property
    def total(self) -> float:
        return self.layers + self.recompute_peak + self.embedding_and_loss


def decoder_stage_bytes(config: Config, layer_indices: Iterable[int], first: bool, last: bool,
                        tp: int = 1, sp: bool = False, ep: int = 1) -> StageBytes:
    dec, p = config.model.decoder, _p(config)
    indices = list(layer_indices)
    T = config.data.seq_length * config.train.micro_batch_size
    seq_split = tp if sp else 1
    if config.train.recompute == "full":
        group = config.train.recompute_num_layers
        groups = [indices[i:i + group] for i in range(0, len(indices), group)]
        kept = len(groups) * T * dec.hidden_size * p / seq_split
        # The rerun's first norm saves the group input itself when it keeps x as it is (our
        # kernel, or torch's in fp32): that storage is already kept, not new at the peak.
        shared = T * dec.hidden_size * p / seq_split if _norm_keeps_its_input(config) else 0.0
        peak = max((sum(decoder_layer_bytes(config, dec.is_moe_layer(i), tp, sp, ep, "none").total
                        for i in g) for g in groups), default=0.0) - shared
    else:
        kept = sum(decoder_layer_bytes(config, dec.is_moe_layer(i), tp, sp, ep).total
                   for i in indices)
        peak = 0.0
    edge = 0.0
    if first:
        edge += T * 8
    if last:
        D = dec.hidden_size
        edge += T * (norm_keep_bytes(config) + D * p) / seq_split
        edge += T * (4 * dec.padded_vocab_size / tp + 9)
    return StageBytes(kept, peak, edge)


def _bottleneck(c_in: int, c: int, positions: int, p: int) -> float:
    """One RegNet bottleneck at ``positions`` for one image (see the module docstring)."""
    norms = 4 if c_in != c else 3
    maps = c_in + 9 * c + (c if c_in != c else 0)
    rd = int(round(c_in * 0.25))
    return positions * (maps * p + norms * 8) + (2 * c + 2 * rd) * p


def connector_bytes(config: Config, images: int) -> float:
    """What the connector saves for ``images`` images (0 when it and the ViT are frozen)."""
    m, p = config.model, _p(config)
    con, vis, D = m.connector, m.vision, m.decoder.hidden_size
    P, V = vis.num_patches, con.num_tokens
    if con.type == "avg_pool":  # the pooling keeps its [W, P] input
        per = P * vis.width * p + V * (vis.width + 2 * D) * p
    elif con.type == "attn_pool":
        W = vis.width
        per = (P * (2 * W * p + 8) + V * W * p + 2 * P * W * p + V * (W * p + 4 * 1)
               + V * W * p + V * (W + 2 * D) * p)
    else:
        c = con.hidden_size
        per = sum(_bottleneck(vis.width if i == 0 else c, c, P, p) for i in range(con.depth))
        per += c * P * p  # the adaptive pooling keeps its input
        per += sum(_bottleneck(c, c, V, p) for _ in range(con.depth))
        per += V * (c + 2 * D) * p
    return images * per


def vision_bytes(config: Config, images: int, tp: int = 1, recompute: Optional[str] = None,
                 ) -> StageBytes:
    """What the ViT saves for ``images`` images (``layers``; ``recompute_peak`` under full, one
    ViT layer at a time) with the connector and the image itself in ``embedding_and_loss``."""
    m, p = config.model, _p(config)
    vis = m.vision
    recompute = recompute or config.train.recompute
    n, W, M, H = vis.num_patches + 1, vis.width, vis.mlp_dim, vis.num_heads / tp
    tokens = images * n
    mlp = (3 if vis.activation == "quick_gelu" else 2) * M / tp
    ln = 2 * W * p + 8
    layer = tokens * (2 * ln + (3 * W / tp + W / tp + mlp) * p + 4 * H)
    edge = images * 3 * vis.image_size ** 2 * p + tokens * (W * p + 8)
    edge += connector_bytes(config, images)
    if recompute == "full":
        # the rerun layer's input is the kept checkpoint input: not counted twice
        return StageBytes(vis.depth * tokens * W * p, layer - tokens * W * p, edge)
    if recompute == "selective":
        layer -= tokens * 4 * H
    return StageBytes(vis.depth * layer, 0.0, edge)
