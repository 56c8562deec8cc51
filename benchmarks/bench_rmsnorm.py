"""RMSNorm: our fused Triton kernel vs torch's ``rms_norm`` compiled, at the decoder widths.

  ours    mm1_moe.kernels.rmsnorm.rms_norm (fp32 statistics, deterministic grad_weight)
  torch   torch.compile(F.rms_norm) on a GPU; eager F.rms_norm where dynamo is off
          (TORCHDYNAMO_DISABLE=1) or in smoke mode, and the impl column says so

Judged as GB/s over the copy bandwidth measured in the same run. Bytes are the minimal traffic:
forward reads x and writes y (2*T*D elements) plus rstd (4 bytes per row); forward + backward
adds reading grad_y and x and writing grad_x (5*T*D elements, 8 bytes per row), not counting our
[P, D] fp32 grad_weight partials (~2% at T = 16384, D = 4096).

  python benchmarks/bench_rmsnorm.py            # full, on a GPU
  python benchmarks/bench_rmsnorm.py --smoke    # tiny shapes, once (CPU: interpreter)
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

import harness  # noqa: E402

SHAPES = {"mm1-3b-moe": 2560, "mm1-7b-moe": 4096}  # config -> D (decoder width)
SMOKE_SHAPES = {"smoke": 96}
EPS = 1e-5


def torch_rms_norm(smoke: bool) -> Tuple[str, Callable[..., torch.Tensor]]:
    """(impl label, function): torch.compile(F.rms_norm) where it can compile, else eager."""
    if os.environ.get("TORCHDYNAMO_DISABLE", "0") == "1":
        return "torch.rms_norm (eager: TORCHDYNAMO_DISABLE=1)", F.rms_norm
    if smoke or not harness.on_gpu():  # inductor on CPU would spend the smoke run compiling C++
        return "torch.rms_norm (eager: smoke)", F.rms_norm
    return "torch.compile(rms_norm)", torch.compile(F.rms_norm)


def _fwd_bwd(fn: Callable[[], torch.Tensor], inputs, grad: torch.Tensor) -> Callable[[], object]:
    return lambda: torch.autograd.grad(fn(), inputs, grad)  # grads returned, not accumulated


def bench_shape(config: str, D: int, T: int, ceil, smoke: bool) -> List[Dict[str, object]]:
    from mm1_moe.kernels.rmsnorm import rms_norm

    device = "cuda" if harness.on_gpu() else "cpu"
    dtype = torch.bfloat16 if harness.on_gpu() else torch.float32
    size = torch.tensor([], dtype=dtype).element_size()
    x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
    w = torch.ones(D, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(T, D, device=device, dtype=dtype)
    label, theirs = torch_rms_norm(smoke)
    impls = {"ours": lambda: rms_norm(x, w, EPS), label: lambda: theirs(x, (D,), w, EPS)}
    moved = {"rmsnorm_fwd": 2 * T * D * size + 4 * T, "rmsnorm_fwd_bwd": 5 * T * D * size + 8 * T}
    rows = []
    for impl, fn in impls.items():
        for op, run in (("rmsnorm_fwd", fn), ("rmsnorm_fwd_bwd", _fwd_bwd(fn, (x, w), grad))):
            ms = harness.time_ms(run, smoke)
            gbps = moved[op] / (ms * 1e-3) / 1e9
            rows.append({"op": op, "config": config, "D": D, "tokens": T, "impl": impl, "ms": ms,
                         "rate": gbps, "unit": "GB/s", "of_ceiling": gbps / ceil.copy_gbps})
    for row in rows[:2]:  # ours over torch's, same op and shape: > 1 means ours is faster
        row["vs_torch"] = row["rate"] / next(r["rate"] for r in rows[2:] if r["op"] == row["op"])
    return rows


def main() -> int:
    args = harness.base_parser(__doc__.split("\n\n")[0]).parse_args()
    smoke = args.smoke or not harness.on_gpu()
    ceil = harness.ceilings(smoke)
    print(f"ceilings: copy {ceil.copy_gbps:.1f} GB/s, matmul {ceil.matmul_tflops:.3f} TFLOP/s"
          f"{'  (smoke: CPU figures, never GPU figures)' if smoke else ''}")
    shapes = SMOKE_SHAPES if smoke else SHAPES
    token_counts = [64] if smoke else [4096, 16384]
    rows: List[Dict[str, object]] = []
    for config, D in shapes.items():
        for T in token_counts:
            rows += bench_shape(config, D, T, ceil, smoke)
    harness.print_table(rows, ["op", "config", "D", "tokens", "impl", "ms", "rate", "unit",
                               "of_ceiling", "vs_torch"])
    harness.save_results("rmsnorm", rows, args, smoke, ceil)
    return 0


if __name__ == "__main__":
    sys.exit(main())
