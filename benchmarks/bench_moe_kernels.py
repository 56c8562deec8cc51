"""MoE hot-path kernels vs Megatron-core's path, at the MM1-MoE layer shapes.

  dispatch   ours: dispatch_metadata + dispatch       Megatron: moe_utils.permute
  combine    ours: combine (weighted K-row sum)       Megatron: moe_utils.unpermute (with probs)
  experts    ours: swiglu_experts (fused fc1 SwiGLU)  Megatron: SequentialMLP (a GEMM per expert)
             and torch._grouped_mm (where torch has it on this device)

Dispatch/combine are judged as GB/s (bytes read + written) over the measured device copy
bandwidth; expert MLPs as TFLOP/s (forward 6*N*D*F, backward 12*N*D*F for SwiGLU) over the
measured dense matmul rate, and each against the best peer in the same run.

  python benchmarks/bench_moe_kernels.py                # full, on a GPU
  python benchmarks/bench_moe_kernels.py --smoke        # tiny shapes, once (CPU: interpreter)
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List

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


def _row(kind, config, T, impl, ms, amount, ceiling, unit) -> Dict[str, object]:
    rate = amount / (ms * 1e-3) / (1e9 if unit == "GB/s" else 1e12)
    return {"op": kind, "config": config, "tokens": T, "impl": impl, "ms": ms,
            "rate": rate, "unit": unit, "of_ceiling": rate / ceiling}


def bench_shape(config: str, D: int, F: int, E: int, K: int, T: int, ceil, smoke: bool):
    from megatron.core.transformer.moe.moe_utils import permute, unpermute

    from mm1_moe.kernels.combine import combine
    from mm1_moe.kernels.dispatch import dispatch, dispatch_metadata

    device = "cuda" if harness.on_gpu() else "cpu"
    dtype = torch.bfloat16 if harness.on_gpu() else torch.float32
    size = torch.tensor([], dtype=dtype).element_size()
    route, meta, routing_map, probs = _routing(T, E, K, device)
    N = T * K
    x = torch.randn(T, D, device=device, dtype=dtype)
    y = torch.randn(N, D, device=device, dtype=dtype)
    t = lambda fn: harness.time_ms(fn, smoke)  # noqa: E731
    rows: List[Dict[str, object]] = []
    moved = 2 * N * D * size  # dispatch: N rows read (gathered) + N rows written
    rows.append(_row("dispatch", config, T, "ours", t(lambda: dispatch(
        x, dispatch_metadata(route.ids_TK, E))), moved, ceil.copy_gbps, "GB/s"))
    rows.append(_row("dispatch", config, T, "megatron.permute", t(lambda: permute(
        x, routing_map, num_out_tokens=N)), moved, ceil.copy_gbps, "GB/s"))
    _, _, sorted_indices = permute(x, routing_map, num_out_tokens=N)
    moved = (N + T) * D * size  # combine: N rows read + T rows written
    rows.append(_row("combine", config, T, "ours", t(lambda: combine(y, route.weights_TK, meta)),
                     moved, ceil.copy_gbps, "GB/s"))
    rows.append(_row("combine", config, T, "megatron.unpermute", t(lambda: unpermute(
        y, sorted_indices, x.shape, probs=probs, routing_map=routing_map)), moved,
        ceil.copy_gbps, "GB/s"))
    rows += _bench_experts(config, D, F, E, K, T, meta, ceil, smoke, dtype, device)
    return rows


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
    t = lambda fn: harness.time_ms(fn, smoke)  # noqa: E731
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
    harness.print_table(rows, ["op", "config", "tokens", "impl", "ms", "rate", "unit",
                               "of_ceiling", "vs_best_peer"])
    harness.save_results("moe_kernels", rows, args, smoke, ceil)
    return 0


if __name__ == "__main__":
    sys.exit(main())
