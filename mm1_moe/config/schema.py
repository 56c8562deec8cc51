"""The typed configuration tree: one small dataclass per component.

YAML is only storage (see ``loader.py``); cross-field rules live in ``validate.py``. Each field's
docstring-comment says what it controls; ``Literal`` fields list every accepted value.
Sizes derived from others (head dim, data-parallel size, padded vocab) are properties, not fields,
so a config can never disagree with itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional, Union


@dataclass
class VisionConfig:
    """CLIP-style ViT image encoder (MM1: ViT-H/14 at 378 px, 729 patches)."""

    image_size: int = 378
    patch_size: int = 14
    width: int = 1280
    depth: int = 32
    num_heads: int = 16
    mlp_dim: int = 5120
    activation: Literal["gelu", "quick_gelu"] = "gelu"
    layernorm_eps: float = 1e-5
    freeze: bool = False
    """Keep the encoder's weights fixed during training."""

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class ConnectorConfig:
    """Vision-language connector: image features [I, P, width] -> [I, num_tokens, decoder D]."""

    type: Literal["c_abstractor", "avg_pool", "attn_pool"] = "c_abstractor"
    hidden_size: int = 1024
    depth: int = 3
    """RegNet bottleneck blocks per C-Abstractor stage (two stages)."""
    num_tokens: int = 144
    """Image tokens per image after the connector (a square: 64 or 144)."""
    freeze: bool = False


@dataclass
class MoEConfig:
    """Mixture-of-experts FFNs. ``num_experts: 0`` means a dense decoder."""

    num_experts: int = 0
    top_k: int = 2
    layer_freq: Union[int, List[int]] = 1
    """Every Nth layer is MoE (int; layers N-1, 2N-1, ... counting from 0), or an explicit
    0/1 pattern with one entry per decoder layer."""
    expert_ffn_hidden_size: Optional[int] = None
    """FFN width of one expert; defaults to the dense ``ffn_hidden_size``."""
    router_order: Literal["softmax_topk", "topk_softmax"] = "softmax_topk"
    """softmax over all experts then top-k (MM1/ST-MoE), or top-k logits then softmax (Mixtral)."""
    normalize_topk: bool = False
    """softmax_topk only: rescale the K selected probabilities to sum to 1 (as upcycled models
    need for function preservation)."""
    aux_loss_coeff: float = 0.01
    z_loss_coeff: float = 0.001
    balance: Literal["aux_loss", "bias", "both"] = "aux_loss"
    """How expert load is balanced: the auxiliary load-balancing loss (MM1, Switch), a per-expert
    bias on the routing scores nudged toward equal load after every step (DeepSeek-V3's
    auxiliary-loss-free balancing; the aux loss is then reported but not trained on), or both."""
    bias_update_rate: float = 1e-3
    """balance: bias/both: each step moves every expert's bias by this much toward equal load."""
    aux_loss_scope: Literal["micro_batch", "global_batch"] = "micro_batch"
    """Which tokens' expert loads the load-balancing loss uses: each micro-batch's own, or those
    of the whole step so far (all micro-batches up to this one, over the data-parallel ranks;
    Megatron-core's global aux loss). The probabilities are always this micro-batch's."""
    capacity_factor: Optional[float] = None
    """None: dropless. Otherwise each expert takes at most capacity_factor * T * K / E rows."""
    router_jitter: float = 0.0
    """Multiplicative uniform input noise eps (0 disables)."""
    masked_tokens: Literal["route", "pass_through"] = "route"
    """Tokens outside the routing mask (image placeholders, padding): ``route`` sends them to
    experts like any token (but leaves them out of the load statistics and auxiliary losses);
    ``pass_through`` skips the experts for them (the MoE adds 0, the residual carries them)."""

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0


@dataclass
class DecoderConfig:
    """Llama-style decoder: pre-RMSNorm, SwiGLU, RoPE, no biases, untied embeddings."""

    num_layers: int = 32
    hidden_size: int = 4096
    num_attention_heads: int = 32
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; None means one per query head."""
    ffn_hidden_size: int = 12288
    vocab_size: int = 32000
    vocab_pad_multiple: int = 128
    """The embedding is padded to a multiple of this; it must be divisible by the tensor-parallel
    size, and it does not depend on the layout, so every layout has the same logits."""
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    freeze: bool = False
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return -(-self.vocab_size // m) * m

    def is_moe_layer(self, index: int) -> bool:
        """Whether decoder layer ``index`` (0-based, global) has an MoE FFN."""
        if not self.moe.enabled:
            return False
        freq = self.moe.layer_freq
        if isinstance(freq, list):
            return bool(freq[index])
        return (index + 1) % freq == 0


@dataclass
class ModelConfig:
    name: str = "mm1"
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    image_token_id: Optional[int] = None
    """Token id of the image placeholders (the tokenizer's ``<image>``). Set: a multimodal MM1
    (ViT + connector on the first pipeline stage, image rows spliced into the embeddings);
    null: a text-only decoder, no vision tower built."""
    layout_invariant_init: bool = False
    """Initialise every parameter from a generator seeded by its global (layout-independent)
    name, so any TP/PP/DP layout starts from the same weights. Builds one full-size tensor per
    parameter on each rank: for tests, parity checks and small models."""


@dataclass
class ParallelConfig:
    """Megatron-core process groups. The data-parallel size is what remains of the world size."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: Optional[int] = None
    """Model chunks per pipeline rank (interleaved 1F1B); None for plain 1F1B."""
    expert_parallel: int = 1
    expert_tensor_parallel: int = 1
    """Tensor parallelism inside experts. The MoE layer keeps whole experts per rank (1); with
    tensor_parallel > 1 each TP rank runs the MoE on its own copy of the tokens."""
    sequence_parallel: bool = False


@dataclass
class DataConfig:
    source: Literal["synthetic_text", "mm1_mixture"] = "synthetic_text"
    """synthetic_text: a generated, learnable token stream that needs no files. mm1_mixture: MM1's
    interleaved/captions/text mixture from the paths below, packed (mm1_moe/data/loader.py)."""
    interleaved: List[str] = field(default_factory=list)
    """Interleaved-document tar shards (files or globs): key.json (a list of text/image entries, or
    OBELICS's texts/images lists) with its images in the same shard. Empty: the bundled set."""
    captions: List[str] = field(default_factory=list)
    """Image-caption tar shards (files or globs), img2dataset layout: key.jpg + key.txt or
    key.json. Empty: the bundled set."""
    text: List[str] = field(default_factory=list)
    """Text-only files (files or globs): JSONL with a ``text`` field, or plain text (one document
    per file). Empty: the bundled set."""
    weights: List[float] = field(default_factory=lambda: [0.45, 0.45, 0.10])
    """Mixture weights of (interleaved, captions, text): MM1's 45/45/10."""
    tokenizer: str = ""
    """Hugging Face tokenizers JSON or SentencePiece .model with <image>, </s> and <pad>; empty:
    the bundled tokenizer (data/bundled/tokenizer.json, 253 tokens)."""
    blank_images: bool = False
    """Ablation: feed every image as all zeros (the normalised mean colour), so the model sees
    where images are but not what they show."""
    pack_window: int = 16
    """Sequences filled together (first-fit) before any is emitted: more packs tighter."""
    seq_length: int = 4096
    max_images_per_sequence: int = 16
    seed: int = 1234


@dataclass
class TrainConfig:
    steps: int = 200000
    micro_batch_size: int = 1
    global_batch_size: int = 512
    """Sequences per optimizer step, across data-parallel ranks and micro-batches."""
    lr: Optional[float] = None
    """Peak learning rate; None applies MM1's law exp(-0.4214 ln N - 0.5535) for N params."""
    min_lr_ratio: float = 0.1
    warmup_steps: int = 2000
    weight_decay: Optional[float] = None
    """None means 0.1 x peak LR (MM1)."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    distributed_optimizer: bool = False
    """Shard fp32 master weights and Adam moments over the data-parallel ranks (Megatron's
    DistributedOptimizer: grads reduce-scattered, params all-gathered)."""
    dtype: Literal["fp32", "bf16"] = "bf16"
    """bf16: Megatron's mixed precision (bf16 parameters and activations, fp32 main parameters
    and Adam moments in the optimizer, fp32 loss; router logits and softmax stay fp32), on GPU
    and CPU alike. fp32: everything in fp32."""
    grad_reduce_in_fp32: bool = True
    """With dtype=bf16: accumulate gradients over micro-batches and reduce them over the
    data-parallel group in fp32 buffers (false: bf16 buffers, half the gradient memory and
    traffic, rounding at each accumulation). No effect with dtype=fp32."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation (decoder and ViT): trade backward time for activation memory.
    none: keep every activation. selective: rerun core attention (Megatron's ``core_attn``) and
    the MoE experts' fc1 + SwiGLU in the backward; the router, the all-to-all and every linear
    layer keep their activations, so routing is never redone. full: keep only each decoder
    layer group's input and rerun the whole group (router and all-to-all included, with the
    forward's RNG state restored, so routing and jitter repeat exactly); the ViT reruns layer by
    layer."""
    recompute_num_layers: int = 1
    """With recompute=full: decoder layers per recomputed group (Megatron's ``uniform`` method);
    the layers of each pipeline stage must be a multiple of it. 1 keeps one input per layer;
    larger groups keep fewer inputs but hold a whole group's activations while it reruns."""
    seed: int = 1234
    log_interval: int = 1
    output_dir: str = "runs/mm1"
    """Run folder: resolved config, metrics.jsonl, tensorboard/, checkpoints/."""
    save_interval: int = 0
    """Save a checkpoint every N steps (0: only the final one, when save_final)."""
    save_final: bool = True
    resume: bool = True
    """Continue from the newest complete checkpoint in <output_dir>/checkpoints, if any."""
    load_from: Optional[str] = None
    """Start from this checkpoint (a step_* folder, a checkpoints/ root or a run folder) when the run has
    none of its own, e.g. one saved under another parallel layout (it reshards on load)."""
    peak_tflops: Optional[float] = None
    """Device peak for MFU; None looks the GPU up in a table (no MFU on CPU)."""


# kernels.<kind>: auto -> what runs: ours on GPUs; on CPU the torch paths, since the interpreter
# runs our kernels correctly but ~100x slower than torch there (measured in benchmarks/).
AUTO_ON_GPU = {"attention": "triton", "moe": "triton", "norm": "triton"}
AUTO_ON_CPU = {"attention": "sdpa", "moe": "torch", "norm": "torch"}


@dataclass
class KernelsConfig:
    attention: Literal["auto", "triton", "sdpa", "flash_attn", "local"] = "auto"
    """Core attention of the decoder and ViT specs. triton: our flash-attention kernel (causal,
    bidirectional, packed documents); sdpa: torch scaled_dot_product_attention; flash_attn: the
    flash-attn package (GPU only, ``pip install mm1-moe[gpu]``); local: Megatron-core's
    DotProductAttention (no packed documents); auto: triton on GPUs, sdpa on CPU (the
    interpreter runs our kernel correctly but ~100x slower than torch there)."""
    moe: Literal["auto", "triton", "torch"] = "auto"
    """MoE router/dispatch/combine/expert GEMMs: our Triton kernels, or their plain-torch
    references; auto: triton on GPUs, torch on CPU (the interpreter runs the kernels correctly,
    as the tests check, but ~100x slower than torch)."""
    norm: Literal["auto", "triton", "torch"] = "auto"
    """The decoder's RMSNorms (input, pre-MLP, final): our fused Triton kernel (saves x and one
    fp32 1/rms per row), or ``torch.nn.functional.rms_norm`` (on CPU it saves x and x / rms in
    fp32 as well: 8D + 4 bytes per token); auto: triton on GPUs, torch on CPU (the interpreter
    takes ~50 ms per 512 x 128 forward + backward, torch ~1 ms)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
