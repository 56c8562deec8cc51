"""One MoE layer (route -> dispatch -> experts -> combine) forward + backward at a config's shapes:
ours against Megatron-core's ``MoELayer`` and a plain-torch reference, in the same process.

  experts  the MoE FFN alone: ours (``mm1_moe.moe.MoELayer``, Triton kernels), ``ours_unfused``
           (the same at EP=1 with dispatch copying rows out and a weighted combine, instead of
           the experts gathering token rows and scaling them: the fused path's baseline; see
           ``gather_fusion_bytes``), ``torch_reference`` (the same layer on the plain-torch
           reference ops: a loop of matmuls over experts) and ``megatron`` (Megatron-core's
           MoELayer: alltoall dispatcher, TEGroupedMLP or GroupedMLP when Transformer Engine /
           grouped_gemm are installed, else SequentialMLP).
  layer    a whole decoder layer (RMSNorm, attention with RoPE, RMSNorm, MoE FFN): ours (Triton
           attention + our MoE) against Megatron's MoELayer with torch SDPA attention.
  step     a training step of a shrunk MM1 with images (``bench_step.py``).

Each is measured under several routings, reported separately: ``dropless`` (the real router on
random inputs, every routed row kept) and ``balanced`` (the router still runs, then its ids are
overridden by a round-robin assignment that gives every expert exactly T*K/E rows; same compute
path); and under imbalance, what it costs: ``trained`` (the sorted load
profile that the default run's trained router gives on the bundled data, from
``benchmarks/results/trained_routing.json``, stretched to the config's E) and ``skew2`` /
``skew4`` (one expert takes 2x / 4x the mean rows, the rest share evenly). ``max_load`` is each
routing's max/mean rows per expert.

Metrics (per row): tokens/s of forward + backward; TFLOP/s from the explicit count
  MoE FFN forward = router 2*T*D*E + experts 6*N*D*F (N = T*K rows; SwiGLU fc1 D->2F, fc2 F->D),
  forward + backward = 3 x forward;
  layer forward adds QKV/output projections 2*T*D*(2*Hq*Dh + 2*Hkv*Dh) and causal attention
  2*B*S^2*Hq*Dh;
MFU = TFLOP/s over the dense matmul rate measured in this run (harness.ceilings); ``vs_megatron``
is the tokens/s ratio to Megatron's layer with the same routing; peak memory is
torch.cuda.max_memory_allocated over one forward + backward (n/a on CPU).

Targets (H100/H200, mm1-7b-moe, 16384 tokens): ours >= 1.3x Megatron's tokens/s, MFU >= 0.5.

  python benchmarks/bench_moe_layer.py experts --config configs/mm1-7b-moe.yaml --tokens 16384
  python benchmarks/bench_moe_layer.py layer --config configs/mm1-7b-moe.yaml
  python benchmarks/bench_moe_layer.py --smoke          # experts + layer, tiny shapes (CPU)
  torchrun --nproc-per-node 8 benchmarks/bench_moe_layer.py experts --ep 8   # expert parallel
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402
from moe_setup import (DEFAULT_CONFIG, IMBALANCED, TRAINED_PROFILE,  # noqa: E402
                       attention_block_flops, balance, build_moe, check_ep, device_and_dtype,
                       dropless_max_load, ensure_runtime, experts_impl_name, force_routing,
                       free_memory, imbalanced_counts, is_main, load_bench_config,
                       megatron_moe_config, megatron_moe_spec, measure, moe_flops, moe_shapes,
                       peer_ratios, rates)

SMOKE_TOKENS = 64
IMPLS = ("ours", "ours_unfused", "torch_reference", "megatron")
ROUTINGS = ("dropless", "balanced", *IMBALANCED)


# ----------------------------------------------------------------------------- experts
def _moe_call(module, x):
    return module(x)[0]


def bench_experts(config_path: str = DEFAULT_CONFIG, tokens: int = 16384, ep: int = 1,
                  smoke: bool = False, ceil=None, impls: Tuple[str, ...] = IMPLS,
                  routings: Tuple[str, ...] = ROUTINGS) -> List[Dict[str, object]]:
    """Rows for our MoE FFN, Megatron's and the torch reference at the config's shapes, one per
    routing (``ROUTINGS``). Starts (and leaves running) a runtime for the config when none is."""
    from mm1_moe.config.megatron import decoder_transformer_config

    config = load_bench_config(config_path, smoke, ep)
    ensure_runtime(config)
    ceil = ceil or harness.ceilings(smoke)
    device, dtype = device_and_dtype(config)
    tc = decoder_transformer_config(config, use_cpu_initialization=not harness.on_gpu())
    shapes = moe_shapes(config)
    T = SMOKE_TOKENS if smoke else tokens
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, 1, shapes["D"], device=device, dtype=dtype, generator=gen)
    x.requires_grad_(True)
    grad = torch.randn(x.shape, device=device, dtype=dtype, generator=gen)
    router_weight = torch.empty(shapes["E"], shapes["D"], device=device).normal_(
        0.0, config.model.decoder.init_std, generator=gen)
    max_load = dropless_max_load(config, x.detach().view(T, -1), router_weight)
    base = {"bench": "experts", "config": config.model.name, "tokens": T, "ep": ep, **shapes,
            "tokens_per_expert": T * shapes["K"] / shapes["E"],
            "dtype": str(dtype).replace("torch.", "")}
    if "trained" in routings and imbalanced_counts("trained", T, shapes["E"], shapes["K"]) is None \
            and is_main():
        print(f"  routing 'trained' skipped: no {TRAINED_PROFILE} (python "
              "benchmarks/trained_routing.py writes it)", flush=True)
    rows = []
    for impl in _runnable(impls):
        rows += _bench_one_moe(impl, config, tc, device, x, grad, router_weight, max_load, base,
                               ceil, smoke, routings)
    return rows


def _runnable(impls: Tuple[str, ...]) -> Tuple[str, ...]:
    """Megatron's alltoall dispatcher hands its split sizes to all_to_all_single as tensors,
    which gloo refuses: at EP > 1 it runs on GPUs (NCCL) only. ``ours_unfused`` differs from
    ``ours`` at EP = 1 only (EP > 1 always copies rows for the all-to-all)."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world > 1:
        impls = tuple(i for i in impls if i != "ours_unfused")
    if harness.on_gpu() or world == 1 or "megatron" not in impls:
        return impls
    if is_main():
        print("  megatron skipped: its alltoall dispatcher at EP > 1 needs NCCL (GPUs); gloo "
              "refuses the split sizes it passes as tensors", flush=True)
    return tuple(i for i in impls if i != "megatron")


def _bench_one_moe(impl, config, tc, device, x, grad, router_weight, max_load, base, ceil,
                   smoke, routings=ROUTINGS) -> List[Dict[str, object]]:
    layer = build_moe(impl, config, tc, device)
    with torch.no_grad():  # the same router in every implementation: the same dropless routes
        layer.router.weight.copy_(router_weight)
    flops = moe_flops(base["tokens"], base["D"], base["F"], base["E"], base["K"])
    rows = []
    for routing in routings:
        load = max_load
        if routing == "balanced":
            balance(impl, layer)
            load = 1.0
        elif routing in IMBALANCED:
            counts = imbalanced_counts(routing, base["tokens"], base["E"], base["K"])
            if counts is None:
                continue  # no trained profile: said once by bench_experts
            load = force_routing(impl, layer, counts)
        row = {**base, "impl": impl, "experts_impl": experts_impl_name(impl, layer),
               "routing": routing, "max_load": load}
        row.update(measure(layer, x, grad, _moe_call, smoke, rep_ms=500))
        rates(row, base["tokens"], flops, ceil)
        rows.append(row)
        _progress(row)
    del layer
    free_memory()
    return rows


def _progress(row: Dict[str, object]) -> None:
    if is_main():
        print(f"  {row['bench']} {row['config']} T={row['tokens']} {row['routing']:8s} "
              f"{row['impl']:16s} {row['fwd_bwd_ms']:.3f} ms fwd+bwd", flush=True)


# ----------------------------------------------------------------------------- fused gather
def gather_fusion_bytes(T: int, D: int, F: int, K: int, itemsize: int) -> Dict[str, float]:
    """Bytes of memory traffic one forward + backward of one MoE layer moves less with the fused
    EP=1 path (``ours``: the experts read x_TD through the sort, the routing weight scales their
    output rows, combine sums unweighted) than with the copying one (``ours_unfused``), for
    N = T*K routed rows (dropless):

      forward   dispatch's read of N token rows and its write of x_ND, 2*N*D*itemsize (fc1 reads
                the same N rows either way: from x_ND, or from x_TD through the gather index);
      backward  combine's read of y_ND for the routing-weight gradient, N*D*itemsize (the fused
                path takes it as rowdot(h, dy @ w2^T) in the fc2-backward epilogue, where both
                already are). The backward's write of dx_ND and its per-token sum stay
                (``gather_rows_backward`` in place of dispatch's backward), as does combine's
                backward write of dy_ND: each way saves a read, only the forward also a write;
      overhead  the fc2 backward's row-scale partials: N x ceil(F / BLOCK_N) fp32, written and
                read (plus index and weight traffic of a few times N*4 bytes, left out here).

    Memory: x_ND [N, D] is no longer saved for the experts' backward (x_TD is, which the
    router's backward keeps anyway), and the unweighted combine keeps no y_ND for a weight
    gradient: 2*N*D*itemsize less activation memory per layer.
    mm1-7b-moe, T=4096, D=4096, F=12288, K=2, bf16 (N=8192, N*D*2 bytes = 64 MiB): forward
    128 MiB, backward 64 MiB, overhead 6 MiB, net 186 MiB per layer per forward + backward,
    about 65 us at the H100's ~3.0 TB/s copy rate (DESIGN.md). The layer's expert GEMMs are
    18*N*D*F = 7.4 TFLOP, ~9.4 ms at 790 TFLOP/s: the traffic saved is under 1% of the layer's
    time; the 128 MiB of activations per layer per micro-batch is the larger gain. Not measured on
    a GPU yet: the ``ours`` / ``ours_unfused`` rows are that measurement."""
    from mm1_moe.kernels.experts import FC2_BWD_GPU_BLOCKS

    rows = T * K * D * itemsize
    partials = 2 * T * K * -(-F // FC2_BWD_GPU_BLOCKS.block_n) * 4
    return {"forward": 2.0 * rows, "backward": 1.0 * rows, "overhead": float(partials),
            "net": 3.0 * rows - partials, "activations": 2.0 * rows}


def fusion_report(rows: List[Dict[str, object]], ceil, smoke: bool) -> List[str]:
    """One line per (config, tokens, routing) with both ``ours`` and ``ours_unfused`` rows: the
    measured forward and forward + backward times and the bytes the model says are saved."""
    out = []
    for row in rows:
        if row["impl"] != "ours":
            continue
        key = (row["bench"], row["config"], row["tokens"], row["routing"])
        base = [r for r in rows if r["impl"] == "ours_unfused" and
                (r["bench"], r["config"], r["tokens"], r["routing"]) == key]
        if not base:
            continue
        b = base[0]
        itemsize = getattr(torch, str(row["dtype"])).itemsize
        saved = gather_fusion_bytes(row["tokens"], row["D"], row["F"], row["K"], itemsize)
        mib = {k: v / 2**20 for k, v in saved.items()}
        out.append(
            f"fused gather vs copy dispatch, {row['config']} T={row['tokens']} {row['routing']}: "
            f"fwd {row['fwd_ms']:.3f} vs {b['fwd_ms']:.3f} ms ({b['fwd_ms'] / row['fwd_ms']:.2f}x),"
            f" fwd+bwd {row['fwd_bwd_ms']:.3f} vs {b['fwd_bwd_ms']:.3f} ms "
            f"({b['fwd_bwd_ms'] / row['fwd_bwd_ms']:.2f}x); model: -{mib['forward']:.4g} MiB fwd, "
            f"-{mib['backward']:.4g} MiB bwd, +{mib['overhead']:.4g} MiB partials = "
            f"{mib['net']:.4g} MiB net ({saved['net'] / (ceil.copy_gbps * 1e9) * 1e6:.3g} us at "
            f"the measured copy rate), -{mib['activations']:.4g} MiB activations"
            + ("  (smoke: CPU interpreter, not a performance figure)" if smoke else ""))
    return out


# ----------------------------------------------------------------------------- layer
def _layer_spec(impl: str, config, layer_index: int):
    """A decoder layer's spec: ours as the model builds it (Triton attention, our MoE);
    Megatron's MoELayer with torch SDPA attention for the baseline."""
    from mm1_moe.models.decoder import decoder_layer_spec

    config = _with_kernels(config, "triton" if impl == "ours" else "sdpa")
    spec = decoder_layer_spec(config, layer_index)
    if impl == "megatron":
        moe = megatron_moe_spec(config.model.decoder.moe.num_experts)
        spec = dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, mlp=moe))
    return spec


def _with_kernels(config, attention: str):
    import copy

    config = copy.deepcopy(config)
    config.kernels.attention = attention
    config.kernels.moe = "triton"
    return config


def bench_layer(config_path: str = DEFAULT_CONFIG, tokens: int = 16384, ep: int = 1,
                smoke: bool = False, ceil=None,
                routings: Tuple[str, ...] = ROUTINGS) -> List[Dict[str, object]]:
    """Rows for one whole MoE decoder layer (sequences of data.seq_length tokens), ours against
    Megatron's MoELayer + SDPA attention, one per routing."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.spec_utils import build_module

    from mm1_moe.config.megatron import decoder_transformer_config

    config = load_bench_config(config_path, smoke, ep)
    ensure_runtime(config)
    ceil = ceil or harness.ceilings(smoke)
    device, dtype = device_and_dtype(config)
    dec = config.model.decoder
    tc = decoder_transformer_config(config, use_cpu_initialization=not harness.on_gpu())
    S = config.data.seq_length
    T = SMOKE_TOKENS if smoke else tokens
    B = max(1, T // S)
    S = min(S, T)
    T = S * B
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(S, B, dec.hidden_size, device=device, dtype=dtype, generator=gen)
    x.requires_grad_(True)
    grad = torch.randn(x.shape, device=device, dtype=dtype, generator=gen)
    with torch.device(device):
        rope = RotaryEmbedding(dec.head_dim, rotary_percent=1.0, rotary_base=dec.rope_theta,
                               use_cpu_initialization=not harness.on_gpu())(S).to(device)
    shapes = moe_shapes(config)
    flops = moe_flops(T, **shapes) + attention_block_flops(
        B, S, dec.hidden_size, dec.num_attention_heads, dec.kv_heads, dec.head_dim)
    index = next(i for i in range(dec.num_layers) if dec.is_moe_layer(i))
    base = {"bench": "layer", "config": config.model.name, "tokens": T, "ep": ep, **shapes,
            "tokens_per_expert": T * shapes["K"] / shapes["E"], "seq_length": S,
            "dtype": str(dtype).replace("torch.", "")}
    rows = []
    for impl in _runnable(("ours", "megatron")):
        spec = _layer_spec(impl, config, index)
        layer_tc = megatron_moe_config(tc, dec.moe) if impl == "megatron" else tc
        layer = build_module(spec, config=layer_tc, layer_number=index + 1).to(device)
        name = "megatron+sdpa" if impl == "megatron" else "ours"
        call = lambda m, h: m(h, attention_mask=None, rotary_pos_emb=rope)[0]  # noqa: E731
        for routing in routings:
            load = float("nan")
            if routing == "balanced":
                balance(impl, layer.mlp)
                load = 1.0
            elif routing in IMBALANCED:
                counts = imbalanced_counts(routing, T, shapes["E"], shapes["K"])
                if counts is None:
                    continue  # no trained profile (said by bench_experts)
                load = force_routing(impl, layer.mlp, counts)
            row = {**base, "impl": name, "experts_impl": experts_impl_name(impl, layer.mlp),
                   "routing": routing, "max_load": load}
            row.update(measure(layer, x, grad, call, smoke, rep_ms=500))
            rates(row, T, flops, ceil)
            rows.append(row)
            _progress(row)
        del layer
        free_memory()
    return rows


# ----------------------------------------------------------------------------- main
COLUMNS = ["bench", "config", "tokens", "routing", "impl", "experts_impl", "fwd_ms", "fwd_bwd_ms",
           "tokens_per_s", "tflops", "mfu", "vs_megatron", "peak_gib", "max_load"]


def targets(rows: List[Dict[str, object]], smoke: bool) -> List[str]:
    """The issue's targets, judged on the mm1-7b-moe experts rows (never in smoke mode)."""
    if smoke:
        return ["targets: not judged in smoke mode (CPU or tiny shapes)"]
    out = []
    for row in rows:
        if (row["bench"], row["config"], row["impl"]) != ("experts", "mm1-7b-moe", "ours"):
            continue
        speed, mfu = row["vs_megatron"], row["mfu"]
        out.append(f"target {row['routing']} T={row['tokens']}: ours/megatron {speed:.2f}x "
                   f"(>= 1.3: {'MET' if speed >= 1.3 else 'NOT MET'}), MFU {mfu:.1%} "
                   f"(>= 50%: {'MET' if mfu >= 0.5 else 'NOT MET'})")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = harness.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="all",
                        choices=["experts", "layer", "step", "all"],
                        help="experts: the MoE FFN; layer: a decoder layer; step: bench_step.py; "
                             "all (the default): experts and layer")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="YAML config (MoE shapes)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384],
                        help="tokens per step (T); several values sweep tokens per expert")
    parser.add_argument("--ep", type=int, default=1,
                        help="expert-parallel size: one process per rank (torchrun); 1 on one GPU")
    parser.add_argument("--routings", nargs="+", default=list(ROUTINGS), choices=ROUTINGS,
                        help="routings to measure (default: all)")
    args, rest = parser.parse_known_args(argv)
    if args.mode == "step":
        import bench_step

        return bench_step.main(rest + _passthrough(args))
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    message = check_ep(args.ep)
    if message:
        print(f"bench_moe_layer: {message}", file=sys.stderr)
        return 2
    return _run(args)


def _passthrough(args) -> List[str]:
    out = ["--out", args.out]
    if args.smoke:
        out.append("--smoke")
    if args.no_csv:
        out.append("--no-csv")
    if args.config != DEFAULT_CONFIG:
        out += ["--config", args.config]
    return out


def _run(args) -> int:
    from mm1_moe.runtime import shutdown

    smoke = args.smoke or not harness.on_gpu()
    config = load_bench_config(args.config, smoke, args.ep)
    ensure_runtime(config)
    try:
        ceil = harness.ceilings(smoke)
        if is_main():
            print(f"ceilings: copy {ceil.copy_gbps:.1f} GB/s, matmul {ceil.matmul_tflops:.3f} "
                  f"TFLOP/s{'  (smoke: CPU figures, never GPU figures)' if smoke else ''}",
                  flush=True)
        rows: List[Dict[str, object]] = []
        for tokens in ([SMOKE_TOKENS] if smoke else args.tokens):
            routings = tuple(args.routings)
            if args.mode in ("experts", "all"):
                rows += bench_experts(args.config, tokens, args.ep, smoke, ceil,
                                      routings=routings)
            if args.mode in ("layer", "all"):
                rows += bench_layer(args.config, tokens, args.ep, smoke, ceil, routings)
        peer_ratios(rows)
        if is_main():
            _report(rows, ceil, smoke, args)
    finally:
        shutdown()
    return 0


def _report(rows, ceil, smoke: bool, args) -> None:
    harness.print_table(rows, COLUMNS)
    for line in fusion_report(rows, ceil, smoke) + targets(rows, smoke):
        print(line)
    harness.save_results("moe_layer", rows, args, smoke, ceil)


if __name__ == "__main__":
    sys.exit(main())
