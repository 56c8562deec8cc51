"""Draw the benchmark CSVs as PNG charts (matplotlib, optional: without it this says so and
exits 0).

  moe_layer.png    MoE FFN / decoder layer: achieved TFLOP/s vs tokens per expert (T*K/E), one
                   panel per bench and routing (dropless, balanced), ours vs Megatron vs the torch
                   reference; the dashed line is the dense matmul rate measured in the same run
  moe_kernels.png  dispatch / combine (GB/s; dashed: replayed from a CUDA graph, where measured)
                   and expert MLPs (TFLOP/s) vs tokens per expert
  attention.png    forward and backward TFLOP/s per attention shape, per implementation
  step.png         training-step tokens/s and MFU of the shrunk MM1, dropless vs balanced

Each CSV may hold many runs (rows are appended); a chart shows, per card and shape, the rows of
the latest run. Smoke CSVs (``*.smoke.csv``: CPU, tiny shapes) are drawn to ``*.smoke.png``.

  python benchmarks/plot.py                       # benchmarks/results/*.csv -> same folder
  python benchmarks/plot.py OUTDIR [--out DIR]    # e.g. the GPU suite's folder
"""

from __future__ import annotations

import argparse
import csv
import glob
import math
import os
import sys
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
Row = Dict[str, str]
# (E, K) of the configs the kernel benchmark names (bench_moe_kernels.SHAPES, SMOKE_SHAPES).
KERNEL_EK = {"mm1-3b-moe": (64, 2), "mm1-7b-moe": (32, 2), "smoke": (8, 2)}
# A run's identity within a file: rows with the same key and a later date replace older ones.
KEYS = {
    "moe_layer": ("card", "bench", "config", "tokens", "routing", "impl"),
    "moe_kernels": ("card", "op", "config", "tokens", "impl"),
    "attention": ("card", "shape", "impl"),
    "step": ("card", "config", "routing"),
}


def read_csv(path: str) -> List[Row]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def latest(rows: List[Row], key: Sequence[str]) -> List[Row]:
    """Of the rows sharing ``key``, those of the latest date (ISO dates sort as text)."""
    best: Dict[Tuple[str, ...], Row] = {}
    for row in rows:
        k = tuple(row.get(c, "") for c in key)
        if k not in best or row.get("date", "") >= best[k].get("date", ""):
            best[k] = row
    return list(best.values())


def num(row: Row, column: str) -> float:
    try:
        return float(row.get(column, "nan"))
    except ValueError:
        return math.nan


def find_csvs(inputs: Sequence[str]) -> Dict[str, str]:
    """{file stem (e.g. ``moe_layer`` or ``moe_layer.smoke``): path} from files and folders."""
    found: Dict[str, str] = {}
    for item in inputs:
        paths = sorted(glob.glob(os.path.join(item, "*.csv"))) if os.path.isdir(item) else [item]
        for path in paths:
            found[os.path.basename(path)[:-len(".csv")]] = path
    return found


# ----------------------------------------------------------------------------- charts
def _title(fig, rows: List[Row], what: str, smoke: bool) -> None:
    cards = sorted({r.get("card", "?") for r in rows})
    dates = sorted({r.get("date", "")[:10] for r in rows})
    note = "  [SMOKE: CPU, tiny shapes; not a result]" if smoke else ""
    fig.suptitle(f"{what} - {', '.join(cards)} - {dates[-1] if dates else ''}{note}", fontsize=10)


def plot_moe_layer(plt, rows: List[Row], path: str, smoke: bool) -> None:
    rows = latest(rows, KEYS["moe_layer"])
    panels = sorted({(r["bench"], r["routing"]) for r in rows},
                    key=lambda p: (p[0], p[1] != "dropless"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (bench, routing) in zip(axes[0], panels):
        sub = [r for r in rows if (r["bench"], r["routing"]) == (bench, routing)]
        series: Dict[str, List[Row]] = defaultdict(list)
        for r in sub:
            series[r["impl"]].append(r)
        for impl, points in sorted(series.items()):
            points.sort(key=lambda r: num(r, "tokens_per_expert"))
            xs = [num(r, "tokens_per_expert") for r in points]
            ax.plot(xs, [num(r, "tflops") for r in points], marker="o", label=impl)
            for r, x in zip(points, xs):
                ax.annotate(r["config"], (x, num(r, "tflops")), fontsize=6,
                            textcoords="offset points", xytext=(3, 3))
        ceiling = [num(r, "matmul_tflops") for r in sub if not math.isnan(num(r, "matmul_tflops"))]
        if ceiling:
            ax.axhline(max(ceiling), linestyle="--", color="grey", linewidth=1,
                       label="dense matmul (measured)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per expert (T*K/E)")
        ax.set_ylabel("TFLOP/s (forward + backward)")
        ax.set_title(f"{bench}: {routing}", fontsize=9)
        ax.legend(fontsize=7)
    _title(fig, rows, "MoE layer", smoke)
    _save(plt, fig, path)


def plot_moe_kernels(plt, rows: List[Row], path: str, smoke: bool) -> None:
    rows = latest(rows, KEYS["moe_kernels"])
    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(1, len(ops), figsize=(4.5 * len(ops), 4.0), squeeze=False)
    for ax, op in zip(axes[0], ops):
        sub = [r for r in rows if r["op"] == op]
        series: Dict[Tuple[str, str, str], List[Tuple[float, float]]] = defaultdict(list)
        for r in sub:
            E, K = KERNEL_EK.get(r["config"], (1, 1))
            x = num(r, "tokens") * K / E
            series[(r["impl"], r["config"], "")].append((x, num(r, "rate")))
            if math.isfinite(num(r, "graph_rate")):  # CUDA-graph figure, where measured
                series[(r["impl"], r["config"], "graph")].append((x, num(r, "graph_rate")))
        for (impl, config, graph), points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    linestyle="--" if graph else "-",
                    label=f"{impl} ({config}{', graph' if graph else ''})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per expert (T*K/E)")
        ax.set_ylabel(sub[0].get("unit", "rate"))
        ax.set_title(op, fontsize=9)
        ax.legend(fontsize=6)
    _title(fig, rows, "MoE kernels", smoke)
    _save(plt, fig, path)


def _bars(ax, groups: List[str], impls: List[str], value: Callable[[str, str], float]) -> None:
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        xs = [g + (i - (len(impls) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [value(group, impl) for group in groups], width, label=impl)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=7)
    ax.legend(fontsize=7)


def _two_bar_panels(plt, rows: List[Row], path: str, group: str, series: str,
                    panels: Sequence[Tuple[str, str]], figsize: Tuple[float, float],
                    what: str, smoke: bool) -> None:
    """Side-by-side bar panels, one per (column, y label): a bar group per ``group`` value, a
    bar per ``series`` value."""
    groups = list(dict.fromkeys(r[group] for r in rows))
    names = list(dict.fromkeys(r[series] for r in rows))
    table = {(r[group], r[series]): r for r in rows}
    fig, axes = plt.subplots(1, len(panels), figsize=figsize)
    for ax, (column, label) in zip(axes, panels):
        _bars(ax, groups, names, lambda g, n: num(table.get((g, n), {}), column))
        ax.set_ylabel(label)
    _title(fig, rows, what, smoke)
    _save(plt, fig, path)


def plot_attention(plt, rows: List[Row], path: str, smoke: bool) -> None:
    _two_bar_panels(plt, latest(rows, KEYS["attention"]), path, "shape", "impl",
                    [("fwd_tflops", "fwd TFLOP/s"), ("bwd_tflops", "bwd TFLOP/s")], (11, 4.2),
                    "attention", smoke)


def plot_step(plt, rows: List[Row], path: str, smoke: bool) -> None:
    _two_bar_panels(plt, latest(rows, KEYS["step"]), path, "config", "routing",
                    [("tokens_per_s", "tokens/s"), ("mfu", "MFU (measured matmul)")], (10, 4.0),
                    "training step", smoke)


def _save(plt, fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


PLOTS = {"moe_layer": plot_moe_layer, "moe_kernels": plot_moe_kernels,
         "attention": plot_attention, "step": plot_step}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="*", default=[os.path.join(HERE, "results")],
                        help="CSV files or folders of them (default: benchmarks/results)")
    parser.add_argument("--out", help="folder for the PNGs (default: next to each CSV)")
    args = parser.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot.py: matplotlib is not installed, so no charts were drawn (the CSVs are "
              "complete without them): pip install matplotlib")
        return 0
    drawn = 0
    for stem, path in sorted(find_csvs(args.inputs).items()):
        name, smoke = stem.replace(".smoke", ""), stem.endswith(".smoke")
        rows = read_csv(path)
        if name not in PLOTS or not rows:
            continue
        out_dir = args.out or os.path.dirname(os.path.abspath(path))
        os.makedirs(out_dir, exist_ok=True)
        try:
            PLOTS[name](plt, rows, os.path.join(out_dir, f"{stem}.png"), smoke)
            drawn += 1
        except (KeyError, ValueError) as err:  # a CSV from an older column layout
            print(f"plot.py: skipped {path}: {type(err).__name__}: {err}", file=sys.stderr)
    if not drawn:
        print(f"plot.py: no benchmark CSV to draw in {', '.join(args.inputs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
