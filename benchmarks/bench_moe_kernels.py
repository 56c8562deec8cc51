"""MoE hot-path kernels vs Megatron-core's path and torch, at the MM1-MoE layer shapes.

  dispatch_copy  the row-gather kernel alone (routing metadata made before the timed region)
                 ours: dispatch_fwd          torch.index_select (its token index made beforehand)
  dispatch+meta  dispatch with its routing metadata, the metadata launches timed too
                 ours: dispatch_metadata (3 launches) + dispatch_fwd
                 Megatron: moe_utils.permute (its own sort of routing_map + index_select)
  combine_copy   the weighted K-row sum alone (the metadata dispatch made, beforehand)
                 ours: combine_fwd           torch.index_select (gather, weight, sum over K)
                 Megatron: moe_utils.unpermute (with probs; its sorted indices made beforehand)
  experts_*      ours: swiglu_experts (fused fc1 SwiGLU)  Megatron: SequentialMLP (a GEMM per
                 expert) and torch._grouped_mm (where torch has it on this device)

Dispatch/combine are judged as GB/s (bytes read + written: 2*N*D elements for dispatch, (N+T)*D
for combine, N = T*K) over two ceilings measured in the same run: ``of_ceiling`` over the run's
1 GiB device copy (harness.ceilings) and ``of_copy`` over a torch contiguous copy moving the
same bytes (``same_bytes_copy_gbps``: what a copy reaches at this size). Beside each plain time
(``ms``, do_bench) is a CUDA-graph time (``graph_ms``, harness.time_graph_ms: no launch cost,
so the copy kernel's own bandwidth shows; ``graph_of_copy`` is over the same-bytes copy, also
from a graph). ``graph_ms`` is nan, the reason in ``graph_note``, on CPU, in smoke mode, for
the expert rows, and for Megatron's permute/unpermute (not capturable). Expert MLPs are judged as
TFLOP/s (forward 6*N*D*F, forward + backward 18*N*D*F for SwiGLU) over the measured dense matmul
rate. ``vs_best_peer``: rate over the fastest other implementation of the same op, config and
tokens (plain times).

  python benchmarks/bench_moe_kernels.py                # full, on a GPU
  python benchmarks/bench_moe_kernels.py --smoke        # tiny shapes, once (CPU: interpreter)
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

import harness  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {  # config -> (D, F, E, K) of one MoE layer
    "mm1-3b-moe": (2560, 7680, 64, 2),
    "mm1-7b-moe": (4096, 12288, 32, 2),
}
SMOKE_SHAPES = {"smoke": (64, 96, 8, 2)}


def _runtime():
    """Megatron's SequentialMLP needs parallel_state: a one-process runtime."""
    from mm1_moe.config import load_config
    from mm1_moe.runtime import initialize

    dtype = "bf16" if harness.on_gpu() else "fp32"
    config = load_config(os.path.join(REPO, "configs", "tiny-moe.yaml"), [f"train.dtype={dtype}"])
    initialize(config)


def _megatron_experts(D: int, F: int, E: int, K: int, dtype: torch.dtype, device):
    import torch.nn.functional as Fn
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=1, hidden_size=D, num_attention_heads=8, ffn_hidden_size=F,
        num_moe_experts=E, moe_router_topk=K, moe_ffn_hidden_size=F, gated_linear_unit=True,
        activation_func=Fn.silu, add_bias_linear=False, bias_activation_fusion=False,
        params_dtype=dtype, bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not harness.on_gpu(), gradient_accumulation_fusion=False)
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    mlp = SequentialMLP(E, cfg, MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                              linear_fc2=RowParallelLinear),
                        pg_collection=get_default_pg_collection())
    return mlp.to(device)


def _routing(T: int, E: int, K: int, device):
    from mm1_moe.kernels.dispatch import dispatch_metadata
    from mm1_moe.kernels.router import router

    logits = torch.randn(T, E, device=device)
    route = router(logits, K, "softmax_topk")
    meta = dispatch_metadata(route.ids_TK, E)
    routing_map = torch.zeros(T, E, dtype=torch.bool, device=device)
    routing_map.scatter_(1, route.ids_TK.long(), True)
    probs = torch.zeros(T, E, device=device).scatter_(1, route.ids_TK.long(), route.weights_TK)
    return route, meta, routing_map, probs


@dataclass(frozen=True)
class Timed:
    ms: float
    """plain: harness.time_ms (do_bench on a GPU, a wall-clock median on CPU)"""
    graph_ms: float
    """replayed from a CUDA graph (harness.time_graph_ms); nan where not measured"""
    graph_note: str
    """why graph_ms is nan ('' when measured)"""


# Megatron's permute/unpermute (without drop_and_pad) size their outputs with masked_select,
# which reads a count back to the host: a stream capture fails there, so it is not tried.
NOT_CAPTURABLE = "not capturable: permute/unpermute call masked_select (a host sync)"
EXPERTS_NO_GRAPH = "not measured: expert rows are compute-bound, timed plainly"


def _timed(fn: Callable[[], object], smoke: bool, no_graph: Optional[str] = None) -> Timed:
    """Plain and CUDA-graph times of ``fn``; with ``no_graph`` (the reason) no graph is tried.
    Where the run has no graphs at all (CPU, smoke), that is the reason given."""
    ms = harness.time_ms(fn, smoke)
    why_not = harness.graph_unavailable(smoke) or no_graph
    if why_not:
        return Timed(ms, math.nan, why_not)
    return Timed(ms, *harness.time_graph_ms(fn, smoke))


def _same_bytes_copy(moved: int, like: torch.Tensor, smoke: bool) -> Timed:
    """A contiguous torch copy reading + writing ``moved`` bytes of ``like``'s dtype and device:
    the rate a gather of the same bytes could reach at this size, in this run."""
    src = torch.randn(max(1, moved // (2 * like.element_size())), device=like.device)
    src = src.to(like.dtype)
    dst = torch.empty_like(src)
    return _timed(lambda: dst.copy_(src), smoke)


def _row(kind, config, T, impl, timed: Timed, amount, ceiling, unit,
         copy: Optional[Timed] = None) -> Dict[str, object]:
    """``amount`` (bytes or FLOPs per call) over the times; ``copy``: the same-bytes copy of
    this run, for ``of_copy`` (equal bytes: the ratio of rates is the inverse ratio of times)."""
    scale = 1e9 if unit == "GB/s" else 1e12
    rate = amount / (timed.ms * 1e-3) / scale
    return {"op": kind, "config": config, "tokens": T, "impl": impl, "ms": timed.ms,
            "graph_ms": timed.graph_ms, "rate": rate,
            "graph_rate": amount / (timed.graph_ms * 1e-3) / scale, "unit": unit,
            "of_ceiling": rate / ceiling,
            "of_copy": copy.ms / timed.ms if copy else math.nan,
            "graph_of_copy": copy.graph_ms / timed.graph_ms if copy else math.nan,
            "same_bytes_copy_gbps": amount / (copy.ms * 1e-3) / scale if copy else math.nan,
            "graph_note": timed.graph_note}


def bench_shape(config: str, D: int, F: int, E: int, K: int, T: int, ceil, smoke: bool):
    device = "cuda" if harness.on_gpu() else "cpu"
    dtype = torch.bfloat16 if harness.on_gpu() else torch.float32
    route, meta, routing_map, probs = _routing(T, E, K, device)
    x = torch.randn(T, D, device=device, dtype=dtype)
    y = torch.randn(T * K, D, device=device, dtype=dtype)
    rows = _bench_dispatch(config, E, T, route, meta, routing_map, x, ceil, smoke)
    rows += _bench_combine(config, T, route, meta, routing_map, probs, x, y, ceil, smoke)
    rows += _bench_experts(config, D, F, E, K, T, meta, ceil, smoke, dtype, device)
    return rows


def _bench_dispatch(config, E, T, route, meta, routing_map, x, ceil, smoke):
    """dispatch_copy (the gather kernel alone) and dispatch+meta (the metadata launches too)."""
    from megatron.core.transformer.moe.moe_utils import permute

    from mm1_moe.kernels.dispatch import dispatch_fwd, dispatch_metadata

    N, D = meta.num_rows, x.shape[1]
    moved = 2 * N * D * x.element_size()  # N rows read (gathered) + N rows written
    copy = _same_bytes_copy(moved, x, smoke)
    token_N = (meta.sort_index_N // meta.top_k).long()  # torch's gather index, made once

    def row(op: str, impl: str, timed: Timed) -> Dict[str, object]:
        return _row(op, config, T, impl, timed, moved, ceil.copy_gbps, "GB/s", copy)

    return [
        row("dispatch_copy", "ours", _timed(lambda: dispatch_fwd(x, meta), smoke)),
        row("dispatch_copy", "torch.index_select",
            _timed(lambda: x.index_select(0, token_N), smoke)),
        row("dispatch+meta", "ours",
            _timed(lambda: dispatch_fwd(x, dispatch_metadata(route.ids_TK, E)), smoke)),
        row("dispatch+meta", "megatron.permute",
            _timed(lambda: permute(x, routing_map, num_out_tokens=N), smoke, NOT_CAPTURABLE)),
    ]


def _bench_combine(config, T, route, meta, routing_map, probs, x, y, ceil, smoke):
    """combine_copy: the weighted K-row sum alone (ours, torch) and Megatron's unpermute given
    the sorted indices its permute made outside the timed region."""
    from megatron.core.transformer.moe.moe_utils import permute, unpermute

    from mm1_moe.kernels.combine import combine_fwd

    N, K, D = meta.num_rows, meta.top_k, y.shape[1]
    moved = (N + T) * D * y.element_size()  # N rows read + T rows written
    copy = _same_bytes_copy(moved, y, smoke)
    inverse_N, w_TK = meta.inverse_TK.long(), route.weights_TK.to(y.dtype)
    _, _, sorted_indices = permute(x, routing_map, num_out_tokens=N)

    def torch_combine() -> torch.Tensor:
        return (y.index_select(0, inverse_N).view(T, K, D) * w_TK[..., None]).sum(1)

    def row(impl: str, timed: Timed) -> Dict[str, object]:
        return _row("combine_copy", config, T, impl, timed, moved, ceil.copy_gbps, "GB/s", copy)

    return [
        row("ours", _timed(lambda: combine_fwd(y, route.weights_TK, meta), smoke)),
        row("torch.index_select", _timed(torch_combine, smoke)),
        row("megatron.unpermute", _timed(lambda: unpermute(
            y, sorted_indices, x.shape, probs=probs, routing_map=routing_map), smoke,
            NOT_CAPTURABLE)),
    ]


def _fwd_bwd(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        out = fn()
        out.backward(torch.ones_like(out))
    return run


def _bench_experts(config, D, F, E, K, T, meta, ceil, smoke, dtype, device):
    from mm1_moe.kernels.experts import swiglu_experts

    N = T * K
    xs = torch.randn(N, D, device=device, dtype=dtype, requires_grad=True)
    w1 = (torch.randn(E, D, 2 * F, device=device, dtype=dtype) * D**-0.5).requires_grad_()
    w2 = (torch.randn(E, F, D, device=device, dtype=dtype) * F**-0.5).requires_grad_()
    flops_fwd, flops_fb = 6 * N * D * F, 18 * N * D * F
    t = lambda fn: _timed(fn, smoke, EXPERTS_NO_GRAPH)  # noqa: E731
    ours = lambda: swiglu_experts(xs, w1, w2, meta.offsets_E1)  # noqa: E731
    rows = [_row("experts_fwd", config, T, "ours", t(ours), flops_fwd, ceil.matmul_tflops, "TFLOP/s"),
            _row("experts_fwd_bwd", config, T, "ours", t(_fwd_bwd(ours)), flops_fb,
                 ceil.matmul_tflops, "TFLOP/s")]
    mlp = _megatron_experts(D, F, E, K, dtype, device)
    counts = meta.counts_E.cpu()
    ones = torch.ones(N, device=device, dtype=torch.float32)
    theirs = lambda: mlp(xs, counts, ones)[0]  # noqa: E731
    rows += [_row("experts_fwd", config, T, "megatron.SequentialMLP", t(theirs), flops_fwd,
                  ceil.matmul_tflops, "TFLOP/s"),
             _row("experts_fwd_bwd", config, T, "megatron.SequentialMLP", t(_fwd_bwd(theirs)),
                  flops_fb, ceil.matmul_tflops, "TFLOP/s")]
    grouped = getattr(torch, "_grouped_mm", None)
    if harness.on_gpu() and grouped is not None:
        offs = meta.offsets_E1[1:].to(torch.int32)

        def torch_grouped() -> torch.Tensor:
            gate, up = grouped(xs, w1, offs=offs).chunk(2, dim=-1)
            return grouped(torch.nn.functional.silu(gate) * up, w2, offs=offs)

        try:
            rows.append(_row("experts_fwd", config, T, "torch._grouped_mm", t(torch_grouped),
                             flops_fwd, ceil.matmul_tflops, "TFLOP/s"))
        except RuntimeError as err:  # e.g. not built for this card
            print(f"torch._grouped_mm skipped: {err}", file=sys.stderr)
    return rows


def _vs_best_peer(rows: List[Dict[str, object]]) -> None:
    """ratio of each implementation's rate to the best *other* implementation's (same op,
    config and tokens): > 1 means faster than every peer."""
    for row in rows:
        peers = [r["rate"] for r in rows if r is not row and r["impl"] != row["impl"]
                 and (r["op"], r["config"], r["tokens"]) == (row["op"], row["config"], row["tokens"])]
        row["vs_best_peer"] = row["rate"] / max(peers) if peers else float("nan")


def _print_graph_notes(rows: List[Dict[str, object]]) -> None:
    """graph_ms is nan where it was not measured: say why, once per reason."""
    notes: Dict[str, List[str]] = {}
    for r in rows:
        if r["graph_note"]:
            where = notes.setdefault(r["graph_note"], [])
            if r["op"] not in where:
                where.append(r["op"])
    for note, ops in notes.items():
        print(f"graph_ms nan ({', '.join(ops)}): {note}")


def main() -> int:
    args = harness.base_parser(__doc__.split("\n\n")[0]).parse_args()
    smoke = args.smoke or not harness.on_gpu()
    _runtime()
    ceil = harness.ceilings(smoke)
    print(f"ceilings: copy {ceil.copy_gbps:.1f} GB/s, matmul {ceil.matmul_tflops:.3f} TFLOP/s"
          f"{'  (smoke: CPU figures, never GPU figures)' if smoke else ''}")
    shapes = SMOKE_SHAPES if smoke else SHAPES
    token_counts = [64] if smoke else [4096, 16384, 32768]
    rows: List[Dict[str, object]] = []
    for config, (D, F, E, K) in shapes.items():
        for T in token_counts:
            rows += bench_shape(config, D, F, E, K, T, ceil, smoke)
    _vs_best_peer(rows)
    harness.print_table(rows, ["op", "config", "tokens", "impl", "ms", "graph_ms", "rate",
                               "graph_rate", "unit", "of_ceiling", "of_copy", "graph_of_copy",
                               "vs_best_peer"])
    _print_graph_notes(rows)
    harness.save_results("moe_kernels", rows, args, smoke, ceil)
    return 0


if __name__ == "__main__":
    sys.exit(main())
