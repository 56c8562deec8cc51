"""Dense -> MoE weights, on global (single-process-named) state dicts: the math of upcycling.

Shapes: D width, F dense FFN width, G granularity, C copies of the dense FFN per layer,
E = C * G experts, F' = F / G expert FFN width, K top-k (a multiple of G).

For each MoE layer ``i`` the dense SwiGLU FFN (``decoder.layers.i.mlp.linear_fc1.weight``
[2F, D] = [gate; up], ``linear_fc2.weight`` [D, F]) becomes:
  experts.w1  [E, D, 2F']  expert e = c * G + g holds shard g of the FFN: [gate_g^T | up_g^T],
                           gate_g = gate rows [g F', (g + 1) F')  (SwiGLU splits exactly along F)
  experts.w2  [E, F', D]   fc2 columns of shard g, transposed, times ``w2_scale``
  router.weight [E, D]     zero, or one N(0, std) row per copy repeated G times: the G shards
                           of a copy get identical logits, so top-k picks them together (a
                           "virtual group"; the layout is Megatron's upcycling_utils', copy-major)
Every other tensor (attention, norms, dense layers, embeddings, output layer, vision tower and
connector) is copied unchanged.

Drop-Upcycling (``drop_ratio`` r > 0; Nakamura et al., ICLR 2025, arXiv 2502.19261): in every
expert a random round(r F') of its F' intermediate units (the same units in gate, up and down)
get fresh weights from N(mean, std) of the dense matrix they came from, a different subset per
expert (seeded by the run seed, the layer and the global expert index: the same in any layout).
Naive copies learn fast and then flatten; re-initialising part of each expert diversifies them.
The function is then not preserved; the check measures how far the logits move.

Function preservation. A token routed to k' = K / G whole groups, with weight w_j on each shard
of group j (identical logits -> identical weights), gets
  sum_j w_j * w2_scale * sum_g FFN_g(x) = w2_scale * sum_j w_j * FFN(x) = w2_scale * S / G * FFN(x)
where S = G * sum_j w_j is the sum of its K routing weights. So the MoE layer equals the dense FFN
when w2_scale * S / G == 1:
  - normalized top-k (``topk_softmax``, or ``softmax_topk`` + ``normalize_topk``, or K == E):
    the weights sum to 1, so ``w2_scale = G``: exact for any router;
  - ``softmax_topk`` un-normalized: the weights sum to the top-K probabilities, K / E with a zero
    router (all logits equal), so ``w2_scale = E G / K``: exact with a zero router, only close
    with a random one. This is the factor of Megatron-core's upcycling_utils (which cites He et
    al., "Upcycling Large Language Models into Mixture of Experts", arXiv 2410.07524); Megatron
    spreads it as a cube root over gate, up and fc2, exact only for an activation homogeneous of
    degree 1 (ReLU), which SiLU is not: here the whole factor goes on the linear w2.
Zero-router ties break to the lowest expert index (``kernels/reference/router.py``), so every
token starts on experts 0..K-1 - whole groups, since groups are contiguous - and only the
load-balancing loss spreads them; a small random router starts with diverse routing.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Dict, List, Literal, Mapping, Optional, Tuple

import torch

from ..config import Config, DecoderConfig

RouterInit = Literal["zero", "random"]


class UpcycleError(ValueError):
    """An upcycling request that cannot work; the message names the path, field or tensor."""


# Decoder fields that must agree between the dense source and the MoE config (ffn_hidden_size:
# the MoE config's dense layers keep the dense FFNs).
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "kv_heads", "ffn_hidden_size",
                "vocab_size", "padded_vocab_size", "rope_theta", "norm_eps")


def check_same_decoder(dense: DecoderConfig, moe: DecoderConfig, source: str) -> None:
    """Raise naming each decoder field where the dense source and the MoE config differ."""
    diffs = [f"model.decoder.{name}: the dense model ({source}) has {getattr(dense, name)}, "
             f"the MoE config {getattr(moe, name)}"
             for name in SHAPE_FIELDS if getattr(dense, name) != getattr(moe, name)]
    if diffs:
        raise UpcycleError("the dense model and the MoE config have different shapes:\n  "
                           + "\n  ".join(diffs))


@dataclass(frozen=True)
class UpcyclePlan:
    """What to build for each MoE layer (see the module docstring)."""

    moe_layers: Tuple[int, ...]
    num_experts: int  # E
    top_k: int  # K
    granularity: int  # G
    dense_ffn: int  # F
    router_init: RouterInit
    router_std: float
    w2_scale: float
    normalized: bool  # the K routing weights of a token always sum to 1
    seed: int
    drop_ratio: float = 0.0  # Drop-Upcycling: fraction of each expert's units re-initialised

    @property
    def dropped_units(self) -> int:
        """Intermediate units re-initialised per expert: round(r F'), so within half a unit."""
        return int(round(self.drop_ratio * self.expert_ffn))

    @property
    def copies(self) -> int:
        return self.num_experts // self.granularity

    @property
    def expert_ffn(self) -> int:
        return self.dense_ffn // self.granularity

    def output_multiplier(self) -> Optional[float]:
        """MoE output / dense FFN output, when the same for every token (else None)."""
        if self.normalized:
            return self.w2_scale / self.granularity
        if self.router_init == "zero":
            return self.w2_scale * self.top_k / (self.num_experts * self.granularity)
        return None


def make_plan(config: Config, granularity: int = 1, router_init: RouterInit = "zero",
              router_std: float = 0.02, scale_weights: bool = True,
              drop_ratio: float = 0.0) -> UpcyclePlan:
    """Check the MoE config against the upcycling options; every error names the fields."""
    dec = config.model.decoder
    moe, p = dec.moe, "model.decoder.moe"
    if not moe.enabled:
        raise UpcycleError(f"the MoE config is dense ({p}.num_experts is 0): set the experts "
                           "to upcycle into")
    layers = tuple(i for i in range(dec.num_layers) if dec.is_moe_layer(i))
    if not layers:
        raise UpcycleError(f"{p}.layer_freq ({moe.layer_freq}) makes no layer an MoE layer")
    if router_init not in ("zero", "random"):
        raise UpcycleError(f"router_init ({router_init!r}) must be 'zero' or 'random'")
    if router_init == "random" and not router_std > 0:
        raise UpcycleError(f"router_std ({router_std}) must be > 0 for a random router")
    G, F, E, K = granularity, dec.ffn_hidden_size, moe.num_experts, moe.top_k
    if not isinstance(G, int) or G < 1:
        raise UpcycleError(f"granularity ({G!r}) must be an integer >= 1")
    if F % G:
        raise UpcycleError(f"granularity ({G}) does not divide the dense FFN width "
                           f"model.decoder.ffn_hidden_size ({F})")
    expert_ffn = moe.expert_ffn_hidden_size or F
    if expert_ffn * G != F:
        hint = (f" (or upcycle with granularity {F // expert_ffn})"
                if F % expert_ffn == 0 and expert_ffn < F else "")
        raise UpcycleError(f"{p}.expert_ffn_hidden_size ({expert_ffn}) must be the dense FFN width "
                           f"/ granularity = {F} / {G} = {F // G}: each expert is one of the G "
                           f"shards of the dense FFN{hint}")
    if E % G:
        raise UpcycleError(f"{p}.num_experts ({E}) is not divisible by granularity ({G}): the "
                           "experts are copies of the FFN, each split into G shards")
    if K % G:
        raise UpcycleError(f"{p}.top_k ({K}) is not a multiple of granularity ({G}): the G shards "
                           "of a copy are picked together, so top_k = G x copies per token")
    if not (isinstance(drop_ratio, (int, float)) and 0.0 <= drop_ratio <= 1.0):
        raise UpcycleError(f"drop_ratio ({drop_ratio!r}) must be in [0, 1]: the fraction of each "
                           "expert's intermediate units re-initialised (Drop-Upcycling; the "
                           "paper uses 0.5, 0 copies the dense FFN)")
    normalized = moe.router_order == "topk_softmax" or moe.normalize_topk or K == E
    scale = (float(G) if normalized else E * G / K) if scale_weights else 1.0
    return UpcyclePlan(layers, E, K, G, F, router_init, float(router_std), scale, normalized,
                       config.train.seed, float(drop_ratio))


def expected_exact(plan: UpcyclePlan, config: Config) -> Tuple[bool, List[str]]:
    """Whether the MoE logits must equal the dense ones, and notes: why not, if not; and what a
    zero router does to the first steps' load."""
    moe = config.model.decoder.moe
    notes = []
    if moe.capacity_factor is not None:
        notes.append(f"model.decoder.moe.capacity_factor ({moe.capacity_factor}) can drop routed "
                     "tokens (dropless routing, null, preserves the function)")
    multiplier = plan.output_multiplier()
    if multiplier is None:
        notes.append("un-normalized softmax_topk with a random router scales each token's FFN "
                     "output by w2_scale x its top-k probability sum (near, not exactly, 1); "
                     "a zero router or normalize_topk makes it exact")
    elif not math.isclose(multiplier, 1.0, rel_tol=1e-12):
        notes.append(f"without weight scaling each MoE layer outputs {multiplier:g} x the dense "
                     f"FFN (granularity {plan.granularity}, top_k {plan.top_k}, "
                     f"num_experts {plan.num_experts})")
    if plan.drop_ratio > 0:
        notes.append(f"Drop-Upcycling (drop ratio {plan.drop_ratio:g}): {plan.dropped_units} of "
                     f"each expert's {plan.expert_ffn} intermediate units are re-initialised, so "
                     "function preservation is not expected; the check reports how far the "
                     "step-0 logits move")
    exact = not notes
    if plan.router_init == "zero":
        notes.append("zero router: top-k ties break to the lowest index, so every token starts on "
                     f"experts 0..{plan.top_k - 1} (with expert parallelism, all on EP rank 0) "
                     "until the load-balancing loss spreads them; router_init random (exact "
                     "with normalized top-k) starts with diverse routing")
    return exact, notes


def _router(name: str, plan: UpcyclePlan, width: int) -> torch.Tensor:
    """[E, D]: zero, or C rows N(0, std) (seeded by the tensor's name) each repeated G times."""
    if plan.router_init == "zero":
        return torch.zeros(plan.num_experts, width)
    generator = torch.Generator().manual_seed((plan.seed * 1_000_003 + zlib.crc32(name.encode()))
                                              % 2**63)
    rows_CD = torch.empty(plan.copies, width).normal_(0.0, plan.router_std, generator=generator)
    return rows_CD.repeat_interleave(plan.granularity, dim=0)


def expert_weights(fc1_2FD: torch.Tensor, fc2_DF: torch.Tensor, plan: UpcyclePlan,
                   name: str = "", experts: Optional[range] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(w1 [e, D, 2F'], w2 [e, F', D]) of one MoE layer's ``experts`` (global indices; default
    all E) from its dense FFN; with a drop ratio, ``name`` (the layer's experts prefix) seeds
    each expert's re-initialised units. A rank building only its own experts gets exactly the
    values the whole layer would have in them."""
    G, Fs = plan.granularity, plan.expert_ffn
    experts = range(plan.num_experts) if experts is None else experts
    gate_FD, up_FD = fc1_2FD.float().chunk(2, dim=0)
    fc2 = fc2_DF.float()
    shards = sorted({e % G for e in experts})
    w1_shard = {g: torch.cat([gate_FD[g * Fs:(g + 1) * Fs].t(), up_FD[g * Fs:(g + 1) * Fs].t()],
                             dim=1) for g in shards}
    w2_shard = {g: fc2[:, g * Fs:(g + 1) * Fs].t() * plan.w2_scale for g in shards}
    w1 = torch.stack([w1_shard[e % G] for e in experts])
    w2 = torch.stack([w2_shard[e % G] for e in experts])
    if plan.dropped_units:
        _drop_units_(w1, w2, gate_FD, up_FD, fc2 * plan.w2_scale, plan, name, experts)
    return w1, w2


def drop_units(plan: UpcyclePlan, name: str, expert: int) -> torch.Tensor:
    """The intermediate units of global expert ``expert`` that Drop-Upcycling re-initialises:
    a random subset of size ``plan.dropped_units``, seeded by the run seed, the layer's name
    and the expert's global index, so any layout that builds the expert draws the same one."""
    key = (plan.seed * 1_000_003 + zlib.crc32(f"{name}#{expert}".encode())) % 2**63
    generator = torch.Generator().manual_seed(key)
    return torch.randperm(plan.expert_ffn, generator=generator)[:plan.dropped_units].sort().values


def _drop_units_(w1_eD2F: torch.Tensor, w2_eFD: torch.Tensor, gate_FD: torch.Tensor,
                 up_FD: torch.Tensor, down_DF: torch.Tensor, plan: UpcyclePlan, name: str,
                 experts: range) -> None:
    """Drop-Upcycling (Nakamura et al., ICLR 2025): per expert, the units ``drop_units`` picks get
    new gate, up and down weights drawn from N(mean, std) of the whole dense matrix they came
    from (down: as scaled into the experts). Row i of the tensors is global expert experts[i]."""
    D, Fs, n = w1_eD2F.shape[1], plan.expert_ffn, plan.dropped_units
    moments = [(m.mean().item(), m.std().item()) for m in (gate_FD, up_FD, down_DF)]
    for row, expert in enumerate(experts):
        units = drop_units(plan, name, expert)
        generator = torch.Generator().manual_seed(
            (plan.seed * 7_919 + zlib.crc32(f"{name}#{expert}#init".encode())) % 2**63)
        draw = [torch.empty(shape).normal_(mean, std, generator=generator)
                for (mean, std), shape in zip(moments, ((D, n), (D, n), (n, D)))]
        w1_eD2F[row][:, units] = draw[0]
        w1_eD2F[row][:, Fs + units] = draw[1]
        w2_eFD[row][units, :] = draw[2]


def upcycle_state_dict(dense: Mapping[str, torch.Tensor],
                       plan: UpcyclePlan) -> Dict[str, torch.Tensor]:
    """The MoE model's global state dict from the dense one's (names as in
    ``mm1_moe.models.init.fill_from_global_``). Raises naming a missing or mis-shaped FFN."""
    moe_prefixes = {f"decoder.layers.{i}.mlp." for i in plan.moe_layers}
    out: Dict[str, torch.Tensor] = {}
    for name, tensor in dense.items():
        prefix = next((p for p in moe_prefixes if name.startswith(p)), None)
        if prefix is None:
            out[name] = tensor  # attention, norms, dense layers, embeddings, vision, connector
        elif name not in (f"{prefix}linear_fc1.weight", f"{prefix}linear_fc2.weight"):
            raise UpcycleError(f"dense tensor {name} of an MoE layer's FFN has no place in the "
                               "experts (only bias-free SwiGLU fc1/fc2 upcycle)")
    for prefix in sorted(moe_prefixes):
        fc1, fc2 = f"{prefix}linear_fc1.weight", f"{prefix}linear_fc2.weight"
        for needed in (fc1, fc2):
            if needed not in dense:
                raise UpcycleError(f"the dense model has no {needed}: that layer cannot be "
                                   "upcycled (is the source already a mixture of experts?)")
        F2, D = dense[fc1].shape
        if F2 != 2 * plan.dense_ffn or tuple(dense[fc2].shape) != (D, plan.dense_ffn):
            raise UpcycleError(f"{fc1} {tuple(dense[fc1].shape)} / {fc2} "
                               f"{tuple(dense[fc2].shape)} do not match ffn_hidden_size "
                               f"{plan.dense_ffn}")
        w1, w2 = expert_weights(dense[fc1], dense[fc2], plan, f"{prefix}experts")
        out[f"{prefix}experts.w1"], out[f"{prefix}experts.w2"] = w1, w2
        out[f"{prefix}router.weight"] = _router(f"{prefix}router.weight", plan, D)
    return out
