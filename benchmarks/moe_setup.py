"""Shared by the MoE layer and step benchmarks: a config laid out for one benchmark process, the
three MoE implementations (ours, the torch reference, Megatron-core's MoELayer), forced routing
(balanced, skewed, or a trained router's load profile), timing that is safe across expert-parallel ranks, and the FLOP counts.

Shapes: T tokens, D width, F expert FFN width, E experts, K top-k, N = T*K routed rows; S
sequence, B batch, Hq / Hkv query / key-value heads, Dh head dim.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

import harness  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "mm1-7b-moe.yaml")
# Smoke: the config's MoE settings on tiny widths (a few seconds on a CPU, interpreter included).
SMOKE_OVERRIDES = [
    "model.decoder.hidden_size=64", "model.decoder.num_attention_heads=4",
    "model.decoder.num_query_groups=2", "model.decoder.ffn_hidden_size=96",
    "model.decoder.moe.num_experts=8", "model.decoder.moe.expert_ffn_hidden_size=null",
    "model.decoder.vocab_size=256", "model.decoder.max_position_embeddings=128",
    "data.seq_length=64",
]


# ----------------------------------------------------------------------------- set-up
def load_bench_config(config_path: str, smoke: bool, ep: int = 1, extra: Tuple[str, ...] = ()):
    """The config at ``config_path`` laid out for this benchmark: one pipeline stage, no tensor
    parallelism, ``ep`` expert-parallel ranks, bf16 on a GPU (fp32 on CPU), tiny widths in smoke
    mode."""
    from mm1_moe.config import load_config

    dtype = "bf16" if harness.on_gpu() else "fp32"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    overrides = [f"train.dtype={dtype}", "parallel.tensor_parallel=1",
                 "parallel.pipeline_parallel=1", "parallel.virtual_pipeline=null",
                 f"parallel.expert_parallel={ep}", "parallel.expert_tensor_parallel=1",
                 "parallel.sequence_parallel=false", "train.micro_batch_size=1",
                 f"train.global_batch_size={world}", "model.layout_invariant_init=false"]
    return load_config(config_path, overrides + (SMOKE_OVERRIDES if smoke else []) + list(extra))


def check_ep(ep: int) -> Optional[str]:
    """None when ``ep`` matches the processes started, else the message to print."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if ep == world:
        return None
    if world == 1:
        return (f"--ep {ep} needs {ep} processes, one per GPU (torchrun --nproc-per-node {ep} "
                f"benchmarks/bench_moe_layer.py experts --ep {ep} ...); a single process, i.e. "
                "one GPU, runs --ep 1 only")
    return f"--ep {ep} must equal the number of processes started ({world})"


def device_and_dtype(config) -> Tuple[torch.device, torch.dtype]:
    from mm1_moe.config.megatron import DTYPES

    device = torch.device("cuda", torch.cuda.current_device()) if harness.on_gpu() else \
        torch.device("cpu")
    return device, DTYPES[config.train.dtype]


def megatron_moe_config(tc, moe):
    """Megatron's MoE switches for our MoE config: alltoall dispatcher, dropless, the same aux
    and z-loss coefficients and softmax/top-k order."""
    from megatron.core.transformer.moe import grouped_gemm_util as gg

    grouped = _has_transformer_engine() or gg.grouped_gemm_is_available()
    return dataclasses.replace(
        tc, moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=moe.aux_loss_coeff, moe_z_loss_coeff=moe.z_loss_coeff,
        moe_router_pre_softmax=moe.router_order == "softmax_topk",
        moe_router_topk_scaling_factor=None, moe_grouped_gemm=grouped)


def _has_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def megatron_moe_spec(num_experts: int):
    """Megatron's own MoE spec: its grouped experts where their backend is installed (TE, or
    the grouped_gemm package), else SequentialMLP (one GEMM per expert)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe import grouped_gemm_util as gg

    te = _has_transformer_engine()
    return get_moe_module_spec(use_te=te, num_experts=num_experts,
                               moe_grouped_gemm=te or gg.grouped_gemm_is_available())


def build_moe(impl: str, config, tc, device: torch.device):
    """One MoE FFN module: ``ours`` / ``torch_reference`` (our MoELayer on the Triton kernels /
    the plain-torch reference ops), ``ours_unfused`` (ours with the row-copying dispatch and the
    weighted combine at EP=1, the fused gather path's baseline) or ``megatron`` (Megatron-core's
    MoELayer)."""
    from megatron.core.transformer.spec_utils import build_module

    from mm1_moe.moe import MoELayer

    dec = config.model.decoder
    if impl == "megatron":
        layer = build_module(megatron_moe_spec(dec.moe.num_experts),
                             config=megatron_moe_config(tc, dec.moe))
    else:
        with torch.device(device):
            kernels = "torch" if impl == "torch_reference" else "triton"
            layer = MoELayer(tc, dec.moe, kernels=kernels,
                             ffn_hidden_size=dec.moe.expert_ffn_hidden_size or dec.ffn_hidden_size,
                             fuse_dispatch=impl != "ours_unfused")
    return layer.to(device)


def experts_impl_name(impl: str, layer) -> str:
    if impl == "megatron":
        return type(layer.experts).__name__
    return "torch" if impl == "torch_reference" else "triton"


# ----------------------------------------------------------------------------- routing
def round_robin_ids(T: int, E: int, K: int, device) -> torch.Tensor:
    """ids_TK[t, k] = (t*K + k) mod E: each expert gets T*K/E rows (exactly when E divides T*K),
    and a token's K experts are distinct (K <= E)."""
    return (torch.arange(T * K, device=device) % E).view(T, K)


def balance_ours(layer) -> None:
    """Force balanced routing on our MoELayer: the router runs (logits, weights, losses), then
    its ids are replaced by the round-robin assignment; dispatch, experts and combine see
    exactly T*K/E rows per expert."""
    _override_ours(layer, round_robin_ids)


def _override_ours(layer, ids_fn) -> None:
    route_fn, cache = layer.route, {}
    E = layer.moe.num_experts

    def route(x_TD, token_mask_T):
        out = route_fn(x_TD, token_mask_T)
        T, K = out.ids_TK.shape
        if T not in cache:
            ids = ids_fn(T, E, K, x_TD.device).to(out.ids_TK.dtype)
            cache[T] = (ids, torch.bincount(ids.reshape(-1).long(), minlength=E).to(
                out.counts_E.dtype))
        ids, counts = cache[T]
        return dataclasses.replace(out, ids_TK=ids, counts_E=counts, stat_counts_E=counts)

    layer.route = route


def balance_megatron(layer) -> None:
    """The same override on Megatron's MoELayer: its router's top-k weights are kept (autograd
    and aux loss included) and moved to the round-robin experts in probs and routing_map."""
    _override_megatron(layer, round_robin_ids)


def _override_megatron(layer, ids_fn) -> None:
    router = layer.router
    routing_fn, cache = router.routing, {}

    def routing(logits, padding_mask=None):
        probs_TE, _ = routing_fn(logits, padding_mask=padding_mask)
        T, E = probs_TE.shape
        K = router.topk
        if T not in cache:
            ids = ids_fn(T, E, K, probs_TE.device)
            cache[T] = (ids, torch.zeros(T, E, dtype=torch.bool, device=ids.device)
                        .scatter_(1, ids, True))
        ids, routing_map = cache[T]
        weights_TK = probs_TE.topk(K, dim=1).values
        return torch.zeros_like(probs_TE).scatter(1, ids, weights_TK), routing_map

    router.routing = routing


def balance(impl: str, layer) -> None:
    (balance_megatron if impl == "megatron" else balance_ours)(layer)


# Imbalanced routings for the experts rows (issue 20): the busiest expert sets the pace of an
# expert-parallel step, and a grouped GEMM's tail tiles and idle SMs show at one GPU too.
SKEWED = {"skew2": 2.0, "skew4": 4.0}  # max rows per expert / mean
TRAINED_PROFILE = os.path.join(REPO, "benchmarks", "results", "trained_routing.json")
IMBALANCED = ("trained", *SKEWED)


def ids_for_counts(counts_E: torch.Tensor, T: int, K: int) -> torch.Tensor:
    """ids_TK with exactly ``counts_E`` rows per expert (sum T*K, each <= T) and K distinct
    experts per token: the experts' rows, laid end to end, fill slot 0 of tokens 0..T-1, then
    slot 1, ...; a run of at most T consecutive positions never meets a token twice."""
    counts = counts_E.long().cpu()
    if int(counts.sum()) != T * K or int(counts.max()) > T:
        raise ValueError(f"counts {counts.tolist()} must sum to T*K={T * K} and each be <= T={T}")
    flat = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    return flat.view(K, T).t().contiguous()


def imbalanced_counts(kind: str, T: int, E: int, K: int) -> Optional[torch.Tensor]:
    """Rows per expert for an imbalanced routing: ``skew2``/``skew4``: expert 0 takes 2x / 4x
    the mean (at most T, one row per token), the rest share the remainder evenly; ``trained``:
    the sorted load profile a trained router produced on the bundled data
    (``benchmarks/trained_routing.py``; its most imbalanced layer), stretched to E experts.
    None when the profile file is missing."""
    total = T * K
    if kind in SKEWED:
        top = min(T, round(SKEWED[kind] * total / E))
        rest = _even(total - top, E - 1)
        return torch.cat([torch.tensor([top]), rest])
    if kind != "trained":
        raise ValueError(f"unknown routing {kind!r}")
    if not os.path.isfile(TRAINED_PROFILE):
        return None
    import json

    with open(TRAINED_PROFILE, encoding="utf-8") as handle:
        profile = json.load(handle)
    loads = max(profile["layers"].values(), key=lambda c: max(c) / (sum(c) / len(c)))
    shares = torch.tensor(sorted(loads, reverse=True), dtype=torch.float64)
    shares = shares / shares.sum()
    # stretch the sorted profile to E experts: the same cumulative curve, resampled
    cum = torch.cat([torch.zeros(1, dtype=torch.float64), shares.cumsum(0)])
    grid = torch.linspace(0, len(shares), E + 1, dtype=torch.float64)
    lower = grid.floor().clamp(max=len(shares) - 1).long()
    at = cum[lower] + (grid - lower) * shares[lower]
    counts = (at * total).round().long().diff().clamp(max=T)
    counts[-1] += total - int(counts.sum())
    return counts


def _even(total: int, n: int) -> torch.Tensor:
    return torch.full((n,), total // n, dtype=torch.long) + (torch.arange(n) < total % n).long()


def force_routing(impl: str, layer, counts_E: torch.Tensor) -> float:
    """Route with exactly ``counts_E`` rows per expert on our layer or Megatron's (as
    ``balance`` does, with ``ids_for_counts`` for the ids). Returns max/mean of the counts."""
    def ids_fn(T: int, E: int, K: int, device) -> torch.Tensor:
        return ids_for_counts(counts_E, T, K).to(device)

    if impl == "megatron":
        _override_megatron(layer, ids_fn)
    else:
        _override_ours(layer, ids_fn)
    counts = counts_E.double()
    return float(counts.max() / counts.mean())


def dropless_max_load(config, x_TD: torch.Tensor, router_weight: torch.Tensor) -> float:
    """Max rows per expert over the mean (1.0 = balanced) of the real router on ``x_TD``
    (both router orders rank experts by the logits)."""
    moe = config.model.decoder.moe
    logits = x_TD.float() @ router_weight.float().t()
    ids = logits.topk(moe.top_k, dim=-1).indices
    counts = torch.bincount(ids.reshape(-1), minlength=moe.num_experts).double()
    return float(counts.max() / counts.mean())


# ----------------------------------------------------------------------------- timing
def sync() -> None:
    if harness.on_gpu():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], smoke: bool, rep_ms: int) -> float:
    """harness.time_ms in one process. Across ranks (expert parallel) every rank must run the
    collectives the same number of times, which do_bench's self-sized loop does not promise:
    there, a fixed count."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return harness.time_ms(fn, smoke, rep_ms=rep_ms)
    iters = 1 if smoke else 10
    for _ in range(1 if smoke else 3):
        fn()
    sync()
    torch.distributed.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) * 1e3 / iters


def peak_memory_gib(fn: Callable[[], object]) -> object:
    """Peak bytes allocated during one call of ``fn`` (GiB; weights and inputs included)."""
    if not harness.on_gpu():
        fn()
        return "n/a"
    sync()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() / 2**30


def measure(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, call: Callable,
            smoke: bool, rep_ms: int) -> Dict[str, object]:
    """Forward and forward + backward milliseconds, and the peak memory of one step."""

    def forward():
        return call(module, x)

    def step():
        forward().backward(grad)

    peak = peak_memory_gib(step)  # also the first call: compiles, autotunes, allocates
    fwd_ms = time_ms(forward, smoke, rep_ms)
    fwd_bwd_ms = time_ms(step, smoke, rep_ms)
    return {"fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms, "peak_gib": peak}


# ----------------------------------------------------------------------------- FLOPs
def moe_flops(T: int, D: int, F: int, E: int, K: int) -> float:
    """Forward FLOPs of the MoE FFN: router 2*T*D*E + SwiGLU experts 6*N*D*F, N = T*K."""
    return 2.0 * T * D * E + 6.0 * T * K * D * F


def attention_block_flops(B: int, S: int, D: int, Hq: int, Hkv: int, Dh: int) -> float:
    """Forward FLOPs of the attention block: QKV and output projections plus causal
    attention (QK^T and AV, halved by the causal mask)."""
    T = B * S
    return 2.0 * T * D * (2 * Hq * Dh + 2 * Hkv * Dh) + 2.0 * B * S * S * Hq * Dh


def moe_shapes(config) -> Dict[str, int]:
    dec = config.model.decoder
    return {"D": dec.hidden_size, "F": dec.moe.expert_ffn_hidden_size or dec.ffn_hidden_size,
            "E": dec.moe.num_experts, "K": dec.moe.top_k}


def rates(row: Dict[str, object], T: int, flops_fwd: float, ceil) -> None:
    seconds = row["fwd_bwd_ms"] * 1e-3
    row["tokens_per_s"] = T / seconds
    row["tflops"] = 3.0 * flops_fwd / seconds / 1e12
    row["mfu"] = row["tflops"] / ceil.matmul_tflops


def peer_ratios(rows: List[Dict[str, object]]) -> None:
    """vs_megatron: tokens/s over Megatron's (same bench, config, tokens, routing);
    vs_best_peer: over the fastest other implementation."""
    for row in rows:
        same = [r for r in rows if (r["bench"], r["config"], r["tokens"], r["routing"]) ==
                (row["bench"], row["config"], row["tokens"], row["routing"])]
        megatron = [r["tokens_per_s"] for r in same if r["impl"].startswith("megatron")]
        peers = [r["tokens_per_s"] for r in same if r["impl"] != row["impl"]]
        row["vs_megatron"] = row["tokens_per_s"] / megatron[0] if megatron else float("nan")
        row["vs_best_peer"] = row["tokens_per_s"] / max(peers) if peers else float("nan")


# ----------------------------------------------------------------------------- process
def free_memory() -> None:
    gc.collect()
    if harness.on_gpu():
        torch.cuda.empty_cache()


def is_main() -> bool:
    """Rank 0, or the only process: the one that prints and writes CSV rows."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def ensure_runtime(config) -> None:
    """Start the runtime (torch.distributed + Megatron's groups) for ``config`` unless one is."""
    from megatron.core import parallel_state as ps

    from mm1_moe.runtime import initialize

    if not ps.model_parallel_is_initialized():
        initialize(config)
