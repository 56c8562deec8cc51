"""Model facts by formula: parameter counts, FLOPs per token and per-GPU memory of a layout.

Pure Python (no torch). Every number follows from the config alone.

Parameters (D = decoder hidden, F = FFN, V = padded vocab, E experts, K = top_k):
  decoder layer: 2D (two RMSNorms) + D*H*hd (Q) + 2*D*KV*hd (K, V) + H*hd*D (O), no biases;
  dense FFN 3*D*F (SwiGLU); MoE FFN E*3*D*F_e experts + D*E router. Plus untied input embedding
  and output layer, V*D each, and the final RMSNorm D.
  ViT (as HF CLIPVisionModel): patch conv 3*p*p*W, CLS W, positions (P+1)*W, pre/post LN 2W each;
  per layer 2 LNs 4W, q/k/v/o 4*(W*W+W), fc1 W*M+M, fc2 M*W+W.
  C-Abstractor (Honeybee): positions P*W, two stages of ``depth`` RegNet bottlenecks, readout
  MLP hidden->D->D with biases. Active = total - (E-K)/E of the expert weights.

FLOPs per token (Megatron / Narayanan et al. 2021 counting, one multiply-add = 2 FLOPs):
  forward  = 2 * (active matmul params of the decoder: attention, dense FFN, top-K experts,
             routers and the output layer; not the embedding lookup, not norms)
           + 2 * 2 * L * s * (H*hd) / 2   (QK^T and AV, halved for causal masking)
  training = 3 * forward (backward = 2 * forward).
  Per image: ViT 2 * matmul params * (P+1) + 4 * depth * (P+1)^2 * W; connector approximated as
  2 * params * spatial positions for each conv/linear (stage 1 at P positions, stage 2 and the
  readout at num_tokens, squeeze-excitation at one position). Amortised per token with
  ``max_images_per_sequence`` images per ``seq_length`` tokens (x3 for training unless frozen).

Memory per GPU (bytes), Megatron-core with the distributed optimizer:
  weights 2 per param (4 when train.dtype is fp32); grads 4 (fp32 grad buffer; 2 in bf16 with
  train.grad_reduce_in_fp32 off); optimizer 12
  (fp32 master + Adam m, v; 8 for fp32 training, which has no master copy) divided by dp for dense
  params and by the expert-data-parallel size dp*tp/(ep*etp) (at least 1) for expert params.
  Dense params are split by tp, experts by ep*etp (etp defaults to tp). Layers are split evenly
  over pp: the first stage also holds the embedding, ViT and connector, the last the output
  layer; the larger of the two is reported (virtual pipelining is ignored).
  Activations: the bytes autograd saves for the backward, by the formulas of
  ``mm1_moe.activations`` (measured term by term, checked within 10% of the saves a forward
  really makes: tests/unit/test_activation_memory.py), for ``train.dtype`` and
  ``train.recompute``; times pp micro-batches in flight on the first stage under 1F1B (1 on the
  last). The first stage adds the ViT + connector (per micro-batch's images; nothing when both
  are frozen), the last the final norm and the loss's fp32 softmax. With full recomputation the
  backward reruns one group at a time: ``recompute_peak`` is the largest group's bytes, once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .activations import connector_bytes, decoder_stage_bytes, vision_bytes
from .config.schema import Config, ConnectorConfig, DecoderConfig, VisionConfig

GIB = float(2**30)


# ----------------------------------------------------------------------------- parameters
@dataclass
class ParamCounts:
    vision: int
    connector: int
    decoder_dense: int
    """Everything in the decoder except expert weights and routers (embeddings included)."""
    experts: int
    routers: int
    total: int
    active: int

    def as_dict(self) -> Dict[str, int]:
        return asdict(self)


def _linear(c_in: int, c_out: int) -> int:
    return c_in * c_out + c_out


def decoder_layer_params(dec: DecoderConfig, index: int) -> Tuple[int, int, int]:
    """(dense, experts, router) parameters of decoder layer ``index``."""
    d, hd = dec.hidden_size, dec.head_dim
    attn = d * dec.num_attention_heads * hd * 2 + 2 * d * dec.kv_heads * hd
    dense = 2 * d + attn
    if not dec.is_moe_layer(index):
        return dense + 3 * d * dec.ffn_hidden_size, 0, 0
    e = dec.moe.num_experts
    f_e = dec.moe.expert_ffn_hidden_size or dec.ffn_hidden_size
    return dense, e * 3 * d * f_e, d * e


def vision_params(vis: VisionConfig) -> int:
    w, m, p = vis.width, vis.mlp_dim, vis.patch_size
    embed = 3 * p * p * w + w + (vis.num_patches + 1) * w
    layer = 4 * w + 4 * _linear(w, w) + _linear(w, m) + _linear(m, w)
    # pre-LN 2W; no post-LN: CLIP applies it only to the pooled CLS output, which MM1's
    # connector never reads (it takes the last hidden states without CLS)
    return embed + 2 * w + vis.depth * layer


def bottleneck_params(c_in: int, c_out: int) -> Tuple[int, int]:
    """(spatial, squeeze-excitation) parameters of one RegNet bottleneck block (width c_out)."""
    rd = int(round(c_in * 0.25))
    spatial = c_in * c_out + 2 * c_out + 9 * c_out + 2 * c_out + c_out * c_out + 2 * c_out
    if c_in != c_out:
        spatial += c_in * c_out + 2 * c_out
    return spatial, _linear(c_out, rd) + _linear(rd, c_out)


def _stage_blocks(c_in: int, hidden: int, depth: int) -> List[Tuple[int, int]]:
    return [bottleneck_params(c_in if i == 0 else hidden, hidden) for i in range(depth)]


def _readout(c_in: int, d: int) -> int:
    return _linear(c_in, d) + _linear(d, d)


def connector_params(con: ConnectorConfig, vis: VisionConfig, d: int) -> int:
    w = vis.width
    if con.type == "avg_pool":
        return _readout(w, d)
    if con.type == "attn_pool":
        return con.num_tokens * w + 4 * _linear(w, w) + 2 * w + _readout(w, d)
    blocks = _stage_blocks(w, con.hidden_size, con.depth) + _stage_blocks(
        con.hidden_size, con.hidden_size, con.depth)
    return vis.num_patches * w + sum(a + b for a, b in blocks) + _readout(con.hidden_size, d)


def param_counts(config: Config) -> ParamCounts:
    m, dec = config.model, config.model.decoder
    layers = [decoder_layer_params(dec, i) for i in range(dec.num_layers)]
    dense = sum(x[0] for x in layers) + (2 * dec.padded_vocab_size + 1) * dec.hidden_size
    experts, routers = sum(x[1] for x in layers), sum(x[2] for x in layers)
    vision = vision_params(m.vision)
    connector = connector_params(m.connector, m.vision, dec.hidden_size)
    total = vision + connector + dense + experts + routers
    inactive = 0
    if dec.moe.enabled:
        e = dec.moe.num_experts
        inactive = experts * (e - dec.moe.top_k) // e
    return ParamCounts(vision, connector, dense, experts, routers, total, total - inactive)


# ----------------------------------------------------------------------------- FLOPs
def decoder_flops_per_token(config: Config) -> Dict[str, float]:
    """Forward and training FLOPs of the decoder per token (formula in the module docstring)."""
    dec, s = config.model.decoder, config.data.seq_length
    p = param_counts(config)
    embedding = dec.padded_vocab_size * dec.hidden_size
    norms = dec.hidden_size * (2 * dec.num_layers + 1)
    active_matmul = p.active - p.vision - p.connector - embedding - norms
    attn = 2 * 2 * dec.num_layers * s * dec.num_attention_heads * dec.head_dim / 2
    forward = 2.0 * active_matmul + attn
    return {"forward": forward, "training": 3.0 * forward}


def vision_flops_per_image(vis: VisionConfig) -> float:
    w, m, n = vis.width, vis.mlp_dim, vis.num_patches + 1
    matmul = 3 * vis.patch_size**2 * w + vis.depth * (4 * w * w + 2 * w * m)
    return 2.0 * matmul * n + 4.0 * vis.depth * n * n * w


def connector_flops_per_image(con: ConnectorConfig, vis: VisionConfig, d: int) -> float:
    w, p, k = vis.width, vis.num_patches, con.num_tokens
    if con.type == "avg_pool":
        return 2.0 * _readout(w, d) * k
    if con.type == "attn_pool":
        return 2.0 * _linear(w, w) * (2 * k + 2 * p) + 4.0 * k * p * w + 2.0 * _readout(w, d) * k
    stage1 = _stage_blocks(w, con.hidden_size, con.depth)
    stage2 = _stage_blocks(con.hidden_size, con.hidden_size, con.depth)
    spatial = sum(a for a, _ in stage1) * p + sum(a for a, _ in stage2) * k
    se = sum(b for _, b in stage1 + stage2)
    return 2.0 * (spatial + se + _readout(con.hidden_size, d) * k)


def flops_per_token(config: Config) -> Dict[str, float]:
    """Decoder FLOPs per token plus per-image vision/connector FLOPs and their per-token share."""
    m, data = config.model, config.data
    out = decoder_flops_per_token(config)
    vis = vision_flops_per_image(m.vision)
    con = connector_flops_per_image(m.connector, m.vision, m.decoder.hidden_size)
    per_token = data.max_images_per_sequence / data.seq_length
    vis_mult = 1.0 if m.vision.freeze else 3.0
    con_mult = 1.0 if m.connector.freeze and m.vision.freeze else 3.0
    out.update(vision_forward_per_image=vis, connector_forward_per_image=con,
               images_forward_per_token=(vis + con) * per_token,
               images_training_per_token=(vis * vis_mult + con * con_mult) * per_token)
    out["training_total"] = out["training"] + out["images_training_per_token"]
    return out


# ----------------------------------------------------------------------------- memory
@dataclass
class MemoryBreakdown:
    """Bytes per GPU on the pipeline stage that needs the most (``stage``)."""

    weights: int
    grads: int
    optimizer: int
    activations: int
    """Decoder layers, embedding and loss, times the micro-batches in flight."""
    vision_activations: int
    recompute_peak: int
    """Bytes a recomputed group holds while its backward runs (train.recompute=full)."""
    stage: str

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + \
            self.vision_activations + self.recompute_peak

    def as_dict(self) -> Dict[str, object]:
        return {**asdict(self), "total": self.total}

    def gib(self) -> Dict[str, float]:
        parts = ("weights", "grads", "optimizer", "activations", "vision_activations",
                 "recompute_peak", "total")
        return {k: getattr(self, k) / GIB for k in parts}


def _stage_shard(config: Config, layers: range, first: bool, last: bool, tp: int,
                 expert_split: int) -> Dict[str, float]:
    """Parameters one GPU of a stage holds: dense/expert x trainable/frozen."""
    m, dec = config.model, config.model.decoder
    out = {"dense_train": 0.0, "dense_frozen": 0.0, "expert_train": 0.0, "expert_frozen": 0.0}
    tag = "frozen" if dec.freeze else "train"
    for i in layers:
        dense, experts, router = decoder_layer_params(dec, i)
        out["dense_" + tag] += (dense + router) / tp
        out["expert_" + tag] += experts / expert_split
    vocab = dec.padded_vocab_size * dec.hidden_size
    if first:
        out["dense_" + tag] += vocab / tp
        vis, con = vision_params(m.vision), connector_params(m.connector, m.vision, dec.hidden_size)
        out["dense_" + ("frozen" if m.vision.freeze else "train")] += vis / tp
        out["dense_" + ("frozen" if m.connector.freeze else "train")] += con / tp
    if last:
        out["dense_" + tag] += (vocab + dec.hidden_size) / tp
    return out


def resolve_layout(config: Config, tp: Optional[int] = None, pp: Optional[int] = None,
                   ep: Optional[int] = None, dp: Optional[int] = None,
                   world_size: Optional[int] = None) -> Dict[str, object]:
    """tp/pp/ep default to config.parallel; dp to world_size // (tp*pp), else 1."""
    par = config.parallel
    tp, pp, ep = tp or par.tensor_parallel, pp or par.pipeline_parallel, ep or par.expert_parallel
    if dp is None:
        dp = world_size // (tp * pp) if world_size else 1
    etp = par.expert_tensor_parallel or tp
    return {"tp": tp, "pp": pp, "ep": ep, "dp": dp, "etp": etp,
            "edp": max(1.0, dp * tp / (ep * etp)), "sequence_parallel": par.sequence_parallel
            and tp > 1, "micro_batch_size": config.train.micro_batch_size,
            "seq_length": config.data.seq_length, "dtype": config.train.dtype,
            "recompute": config.train.recompute}


def _vision_activations(config: Config, tp: int) -> float:
    """ViT + connector bytes of one micro-batch's images (0 when both are frozen)."""
    m = config.model
    images = config.train.micro_batch_size * config.data.max_images_per_sequence
    if m.image_token_id is None or not images:
        return 0.0
    if m.vision.freeze:
        return 0.0 if m.connector.freeze else connector_bytes(config, images)
    return vision_bytes(config, images, tp).total


def memory_per_gpu(config: Config, tp: Optional[int] = None, pp: Optional[int] = None,
                   ep: Optional[int] = None, dp: Optional[int] = None,
                   world_size: Optional[int] = None) -> MemoryBreakdown:
    """Per-GPU bytes of the heavier of the first and last pipeline stage (see module doc)."""
    lay = resolve_layout(config, tp, pp, ep, dp, world_size)
    tp, pp, dp, edp = lay["tp"], lay["pp"], lay["dp"], lay["edp"]
    w_bytes, o_bytes = (4, 8) if config.train.dtype == "fp32" else (2, 12)
    g_bytes = 2 if config.train.dtype == "bf16" and not config.train.grad_reduce_in_fp32 else 4
    vis_act = _vision_activations(config, tp)
    n = config.model.decoder.num_layers
    per = n // pp
    stages = [("first", range(0, per), True, pp == 1, pp)]
    if pp > 1:
        stages.append(("last", range(n - per, n), False, True, 1))
    mems = []
    for name, layers, first, last, in_flight in stages:
        sh = _stage_shard(config, layers, first, last, tp, lay["ep"] * lay["etp"])
        act = decoder_stage_bytes(config, layers, first, last, tp, lay["sequence_parallel"],
                                  lay["ep"])
        mems.append(MemoryBreakdown(
            weights=int(sum(sh.values()) * w_bytes),
            grads=int((sh["dense_train"] + sh["expert_train"]) * g_bytes),
            optimizer=int(o_bytes * (sh["dense_train"] / dp + sh["expert_train"] / edp)),
            activations=int((act.layers + act.embedding_and_loss) * in_flight),
            vision_activations=int(vis_act * in_flight) if first else 0,
            recompute_peak=int(act.recompute_peak),
            stage=name))
    return max(mems, key=lambda m: m.total)


# ----------------------------------------------------------------------------- reports
def info_report(config: Config, tp: Optional[int] = None, pp: Optional[int] = None,
                ep: Optional[int] = None, dp: int = 1) -> Dict[str, object]:
    """One JSON-serialisable summary: parameters, FLOPs per token, memory per GPU, layout.
    ``params.decoder`` is the decoder without experts and routers."""
    lay = resolve_layout(config, tp, pp, ep, dp)
    p = param_counts(config)
    mem = memory_per_gpu(config, lay["tp"], lay["pp"], lay["ep"], lay["dp"])
    return {
        "name": config.model.name,
        "total_params": p.total,
        "active_params": p.active,
        "params": {"vision": p.vision, "connector": p.connector, "decoder": p.decoder_dense,
                   "experts": p.experts, "routers": p.routers},
        "flops_per_token": flops_per_token(config),
        "memory_per_gpu_bytes": mem.as_dict(),
        "layout": lay,
    }


def _count(n: float) -> str:
    """Billions with 2 decimals; small counts in M or as they are (tiny test models)."""
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M" if n >= 1e4 else str(int(n))


def _gflops(x: float) -> str:
    return f"{x / 1e9:.2f}" if x >= 1e8 else f"{x / 1e9:.3g}"


def _gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB" if x >= GIB / 10 else f"{x / 2**20:.2f} MiB"


def format_report(report: Dict[str, object]) -> str:
    """A readable text table of an ``info_report``."""
    params, fl = report["params"], report["flops_per_token"]
    mem, lay = report["memory_per_gpu_bytes"], report["layout"]
    rows: List[Tuple[str, str]] = [("model", str(report.get("name", ""))),
                                   ("total params", _count(report["total_params"])),
                                   ("active params", _count(report["active_params"]))]
    rows += [(f"  {k}", _count(v)) for k, v in params.items()]
    for key, label in (("training", "training GFLOPs/token (decoder)"),
                       ("forward", "forward GFLOPs/token (decoder)"),
                       ("vision_forward_per_image", "ViT forward GFLOPs/image"),
                       ("connector_forward_per_image", "connector forward GFLOPs/image"),
                       ("training_total", "training GFLOPs/token with images")):
        rows.append((label, _gflops(fl[key])))
    layout = ", ".join(f"{k}={lay[k]}" for k in ("tp", "pp", "ep", "dp"))
    if lay.get("sequence_parallel"):
        layout += ", sequence parallel"
    rows.append((f"memory per GPU ({layout}; {lay.get('dtype')}, recompute "
                 f"{lay.get('recompute')}; {mem['stage']} stage)", ""))
    for key in ("weights", "grads", "optimizer", "activations", "vision_activations",
                "recompute_peak", "total"):
        rows.append((f"  {key}", _gib(mem[key])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _experts_cell(dec: DecoderConfig) -> str:
    moe = dec.moe
    if not moe.enabled:
        return "-"
    n = moe.layer_freq
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    where = (f"{sum(n)} of {dec.num_layers} layers" if isinstance(n, list)
             else "every layer" if n == 1 else f"every {n}{suffix}")
    return f"{moe.num_experts} ({where}, top-{moe.top_k})"


def family_table(configs: Sequence[Tuple[str, Config]]) -> str:
    """A markdown table of configs; GFLOPs/token are the decoder's training FLOPs."""
    head = ["config", "layers", "hidden", "heads (KV)", "FFN", "experts (every Nth, top-k)",
            "total params", "active params", "training GFLOPs/token"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, cfg in configs:
        dec, p = cfg.model.decoder, param_counts(cfg)
        ffn = dec.moe.expert_ffn_hidden_size if dec.moe.enabled else None
        cells = [name, str(dec.num_layers), str(dec.hidden_size),
                 f"{dec.num_attention_heads} ({dec.kv_heads})",
                 str(dec.ffn_hidden_size) + (f" (experts {ffn})" if ffn else ""),
                 _experts_cell(dec), _count(p.total), _count(p.active),
                 f"{decoder_flops_per_token(cfg)['training'] / 1e9:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
