"""Tile sweep: every GPU tile candidate of every op (kernels/tile_candidates.py), timed through the
launchers' own block overrides at a config's shapes, to pin the per-op tile tables.

  dispatch_fwd, dispatch_fwd_dot, dispatch_bwd   kernels/dispatch.py (combine reuses them)
  grouped_mm, grouped_mm_dw                      kernels/grouped_gemm.py (dW per rows/expert)
  swiglu_fc1, swiglu_fc2_bwd                     kernels/experts.py
  attention_fwd, attention_bwd                   kernels/attention.py (decoder and ViT shapes)

On a GPU (bf16): each op's table tile first (every op's baseline), then the other candidates, each
compiled by its first call and timed with the harness (do_bench median), within ``--time-box-s``
seconds in all: a candidate whose expected cost (the slowest seen so far for its op, compile
included) would pass the box is skipped, and the skip is printed and written. Every candidate's
output is checked against the table tile's (relative max error); the fastest matching candidate
per op and table key is the winner, written to the CSV (``winner``) and to a small JSON
(``tile_sweep_winners.json``) that says which table entries to change.

On CPU (``--smoke``, the default without a GPU): tiny shapes in the Triton interpreter, fp32,
each candidate run once and checked against the table tile's output; the time column is
``cpu_smoke_ms`` (interpreter wall clock, never a GPU figure) and no winners are named.

  python benchmarks/bench_tile_sweep.py [--config configs/mm1-7b-moe.yaml] [--time-box-s 60]
                                        [--ops swiglu_fc1,grouped_mm_dw] [--rep-ms 25]
  python benchmarks/bench_tile_sweep.py --smoke --out /tmp/sweep
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from mm1_moe.kernels.tile_candidates import TileOp, ops, problems  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "tile_sweep"
# Tiny shapes for the interpreter: two dW buckets (EP=2 halves the experts), a causal packed
# decoder shorter than one 128-row tile (S=97: masks on every edge) and a Dh=80 ViT (padding).
SMOKE_SHAPES = {
    "name": "smoke", "dtype": "fp32",
    "moe": {"tokens": 48, "hidden": 96, "ffn": 80, "experts": 4, "top_k": 2,
            "expert_parallel": 2},
    "attention": [
        {"name": "decoder", "batch": 1, "seq": 97, "heads": 2, "kv_heads": 1, "head_dim": 64,
         "causal": True, "documents": True},
        {"name": "vit", "batch": 1, "seq": 37, "heads": 2, "kv_heads": 2, "head_dim": 80,
         "causal": False, "documents": False}],
}
# Largest relative error (max |candidate - table| / max |table|) a candidate may show: fp32
# differs only in summation order (BLOCK_K, tile split); bf16 outputs round once more, 2**-8.
MATCH_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _tensors(out) -> List[torch.Tensor]:
    items = out if isinstance(out, (tuple, list)) else (out,)
    return [t for t in items if isinstance(t, torch.Tensor)]


def rel_error(got, want) -> float:
    """Largest relative error over the output tensors (0 for an exact match)."""
    worst = 0.0
    for g, w in zip(_tensors(got), _tensors(want)):
        scale = w.float().abs().max().item() if w.numel() else 0.0
        diff = (g.float() - w.float()).abs().max().item() if w.numel() else 0.0
        worst = max(worst, diff / max(scale, 1e-30))
    return worst


class Problem:
    """One op at one shape: inputs and the table tile's output, built on first use and freed
    when the sweep moves on (at mm1-7b-moe fc1's weights alone are 6 GiB of bf16)."""

    def __init__(self, op: TileOp, dims: Dict[str, object]):
        self.op, self.dims = op, dims
        self.key = op.key(dims)
        self.tiles = op.candidates(dims)
        self.inputs: Optional[Dict[str, object]] = None
        self.ref = None
        self.ref_s = 0.0

    def open(self, device, dtype) -> None:
        if self.inputs is None:
            torch.manual_seed(0)
            self.inputs = self.op.build(self.dims, device, dtype)
            start = time.perf_counter()
            self.ref = self.op.run(self.inputs, self.tiles[0])
            _sync()
            self.ref_s = time.perf_counter() - start  # compile + one run of the table tile

    def close(self) -> None:
        self.inputs = self.ref = None
        if harness.on_gpu():
            torch.cuda.empty_cache()


def _sync() -> None:
    if harness.on_gpu():
        torch.cuda.synchronize()


def measure(p: Problem, index: int, smoke: bool, rep_ms: int, dtype) -> Dict[str, object]:
    """Run (and on a GPU time) candidate ``index`` of ``p``; the row says what happened."""
    tile = p.tiles[index]
    row = {"op": p.op.name, "key": p.key, "tile": p.op.label(tile), "table": int(index == 0),
           "gpu_ms": math.nan, "cpu_smoke_ms": math.nan, "first_call_s": math.nan,
           "rel_err": math.nan, "match": 0, "status": "ok", "winner": 0}
    try:
        if index == 0:
            out, row["first_call_s"] = p.ref, p.ref_s
        else:
            start = time.perf_counter()
            out = p.op.run(p.inputs, tile)
            _sync()
            row["first_call_s"] = time.perf_counter() - start
        row["rel_err"] = rel_error(out, p.ref)
        row["match"] = int(row["rel_err"] <= MATCH_TOL.get(dtype, 1e-4))
        if not row["match"]:
            row["status"] = "mismatch"
        del out
        if smoke:
            row["cpu_smoke_ms"] = row["first_call_s"] * 1e3  # one interpreter run
        else:
            row["gpu_ms"] = harness.time_ms(lambda: p.op.run(p.inputs, tile), False, rep_ms)
    except Exception as err:  # noqa: BLE001 - a candidate that fails to compile or launch
        row["status"] = f"error: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
    return row


def plan(probs: Sequence[Problem]) -> List[tuple]:
    """(problem, candidate) in sweep order: every table tile first (each op's baseline, so a
    short box still times them all), then the other candidates problem by problem."""
    order = [(p, 0) for p in probs]
    order += [(p, i) for p in probs for i in range(1, len(p.tiles))]
    return order


def sweep(probs: Sequence[Problem], smoke: bool, time_box_s: float, rep_ms: int, device,
          dtype) -> List[Dict[str, object]]:
    start, cost = time.perf_counter(), {}  # op -> the most one candidate has cost so far
    rows, current = [], None
    for p, i in plan(probs):
        elapsed = time.perf_counter() - start
        expected = cost.get(p.op.name, max(cost.values(), default=0.0))
        if not smoke and elapsed + expected > time_box_s:
            rows.append({"op": p.op.name, "key": p.key, "tile": p.op.label(p.tiles[i]),
                         "table": int(i == 0), "gpu_ms": math.nan, "cpu_smoke_ms": math.nan,
                         "first_call_s": math.nan, "rel_err": math.nan, "match": 0,
                         "status": f"skipped: time box ({elapsed:.0f} s used, ~{expected:.0f} s "
                                   f"more needed, --time-box-s {time_box_s:g})", "winner": 0})
            print(f"skip {p.op.name} {p.key} {rows[-1]['tile']}: {rows[-1]['status']}")
            continue
        t0 = time.perf_counter()
        if current is not p:
            if current is not None:
                current.close()
            current = p
            p.open(device, dtype)
        rows.append(measure(p, i, smoke, rep_ms, dtype))
        cost[p.op.name] = max(cost.get(p.op.name, 0.0), time.perf_counter() - t0)
    if current is not None:
        current.close()
    return rows


def winners(rows: List[Dict[str, object]]) -> Dict[str, Dict[str, Dict[str, object]]]:
    """Per op and table key: the fastest matching candidate and the table tile's time. Marks the
    winning rows (``winner = 1``). GPU rows only."""
    out: Dict[str, Dict[str, Dict[str, object]]] = {}
    groups: Dict[tuple, List[Dict[str, object]]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["key"]), []).append(r)
    for (op, key), group in groups.items():
        timed = [r for r in group if r["match"] and not math.isnan(r["gpu_ms"])]
        if not timed:
            continue
        best = min(timed, key=lambda r: r["gpu_ms"])
        best["winner"] = 1
        table = next((r for r in group if r["table"]), None)
        table_ms = table["gpu_ms"] if table is not None else math.nan
        out.setdefault(op, {})[key] = {
            "tile": best["tile"], "gpu_ms": best["gpu_ms"],
            "table_tile": table["tile"] if table is not None else None, "table_gpu_ms": table_ms,
            "speedup_over_table": table_ms / best["gpu_ms"] if not math.isnan(table_ms) else None,
            "timed": len(timed), "candidates": len(group)}
    return out


def write_winners(path: str, config: str, smoke: bool, time_box_s: float,
                  rows: List[Dict[str, object]], won) -> None:
    env = harness.environment()
    doc = {"config": config, **env, "time_box_s": time_box_s,
           "timing": "cpu-smoke: interpreter wall clock, no winners" if smoke else "gpu do_bench",
           "winners": {} if smoke else won,
           "skipped": [f"{r['op']} {r['key']} {r['tile']}" for r in rows
                       if r["status"].startswith("skipped")],
           "failed": [f"{r['op']} {r['key']} {r['tile']}: {r['status']}" for r in rows
                      if r["status"] not in ("ok",) and not r["status"].startswith("skipped")]}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(doc, handle, indent=2, default=str)
    print(f"winners written to {path}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = harness.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "mm1-7b-moe.yaml"),
                        help="the config whose kernel shapes are swept (GPU runs)")
    parser.add_argument("--time-box-s", type=float, default=60.0,
                        help="seconds for the whole sweep, compiles included (GPU runs)")
    parser.add_argument("--rep-ms", type=int, default=25, help="do_bench repetition window")
    parser.add_argument("--ops", default="", help=f"comma-separated subset of {sorted(ops())}")
    args = parser.parse_args(argv)
    smoke = args.smoke or not harness.on_gpu()
    device = torch.device("cuda" if harness.on_gpu() else "cpu")
    dtype = torch.float32 if smoke else torch.bfloat16  # the interpreter computes bf16 wrongly
    if smoke:
        shapes, config = SMOKE_SHAPES, "smoke"
    else:
        from mm1_moe.config import load_config
        from mm1_moe.kernel_shapes import kernel_shapes

        shapes, config = kernel_shapes(load_config(args.config)), args.config
    capability = 90
    if harness.on_gpu():
        major, minor = torch.cuda.get_device_capability()
        capability = 10 * major + minor
    wanted = {o for o in args.ops.split(",") if o}
    unknown = wanted - set(ops())
    if unknown:
        parser.error(f"unknown ops {sorted(unknown)}; known: {sorted(ops())}")
    probs = [Problem(op, dims) for op, dims in problems(shapes, capability)
             if not wanted or op.name in wanted]
    print(f"{len(probs)} op shapes, {sum(len(p.tiles) for p in probs)} candidates, "
          + ("CPU smoke: interpreter, fp32, one run each (times are not GPU figures)" if smoke
             else f"{torch.cuda.get_device_name()}, bf16, time box {args.time_box_s:g} s"))
    rows = sweep(probs, smoke, args.time_box_s, args.rep_ms, device, dtype)
    won = {} if smoke else winners(rows)
    time_col = "cpu_smoke_ms" if smoke else "gpu_ms"
    harness.print_table(rows, ["op", "key", "tile", "table", time_col, "rel_err", "match",
                               "winner", "status"])
    if smoke:
        rows = [{k: v for k, v in r.items() if k not in ("gpu_ms", "first_call_s", "winner")}
                for r in rows]
    else:
        rows = [{k: v for k, v in r.items() if k != "cpu_smoke_ms"} for r in rows]
    timed = sum(1 for r in rows if r["status"] == "ok")
    print(f"{timed} of {len(rows)} candidates ran and matched the table tile"
          + ("" if smoke else f"; {sum(1 for r in rows if r['status'].startswith('skipped'))} "
             "skipped by the time box"))
    harness.save_results(NAME, [dict(r, config=config) for r in rows], args, smoke)
    if not args.no_csv:
        os.makedirs(args.out, exist_ok=True)
        write_winners(os.path.join(args.out, f"{NAME}_winners{'.smoke' if smoke else ''}.json"),
                      config, smoke, args.time_box_s, rows, won)
    bad = [r for r in rows if r["status"] == "mismatch" or r["status"].startswith("error")]
    return 1 if smoke and bad else 0


if __name__ == "__main__":
    sys.exit(main())
