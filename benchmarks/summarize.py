"""One markdown page of a benchmark folder: the machine, each suite step's status, the issue's
targets, and a table per CSV (the latest run of each shape). Pure Python (no torch).

  python benchmarks/summarize.py OUTDIR [--steps OUTDIR/steps.tsv] [--out OUTDIR/summary.md]

``steps.tsv`` (written by gpu_suite.sh) holds one line per step: name, status, seconds, log.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plot import KEYS, Row, find_csvs, latest, num, read_csv  # noqa: E402

ENVIRONMENT = ("card", "driver", "torch", "triton", "commit", "date")
COLUMNS = {
    "moe_layer": ["bench", "config", "tokens", "ep", "routing", "impl", "experts_impl",
                  "fwd_bwd_ms", "tokens_per_s", "tflops", "mfu", "vs_megatron", "peak_gib",
                  "max_load"],
    "moe_kernels": ["op", "config", "tokens", "impl", "ms", "graph_ms", "rate", "graph_rate",
                    "unit", "of_ceiling", "of_copy", "graph_of_copy", "vs_best_peer",
                    "graph_note"],
    "attention": ["shape", "impl", "B", "S", "Hq", "Hkv", "Dh", "causal", "fwd_tflops",
                  "bwd_tflops", "fwd_of_matmul", "bwd_of_matmul", "fwd_vs_sdpa", "bwd_vs_sdpa"],
    "step": ["config", "routing", "images_per_seq", "tokens", "step_s", "tokens_per_s", "tflops",
             "mfu", "mfu_peak", "peak_gib", "loss"],
}


def cell(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value.replace("|", "/")
    if math.isnan(number):
        return "-"
    if number.is_integer() and abs(number) < 1e7:
        return str(int(number))
    return f"{number:.3g}"


def table(rows: List[Row], columns: Sequence[str]) -> List[str]:
    columns = [c for c in columns if any(c in r for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return lines


def targets(rows: List[Row]) -> List[str]:
    """The issue's targets on the mm1-7b-moe MoE-layer rows of ours."""
    out = []
    for r in rows:
        if (r.get("bench"), r.get("config"), r.get("impl")) != ("experts", "mm1-7b-moe", "ours"):
            continue
        if r.get("smoke") == "1":
            return ["- not judged: smoke rows (CPU, tiny shapes)"]
        speed, mfu = num(r, "vs_megatron"), num(r, "mfu")
        out.append(f"- {r['routing']}, T={r['tokens']}: ours / Megatron MoELayer = {speed:.2f}x "
                   f"(target >= 1.3: {'met' if speed >= 1.3 else 'NOT met'}); MFU {mfu:.1%} "
                   f"(target >= 50%: {'met' if mfu >= 0.5 else 'NOT met'})")
    return out or ["- no mm1-7b-moe experts rows of ours"]


def steps_table(path: Optional[str]) -> List[str]:
    if not path or not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as handle:
        rows = [dict(zip(("step", "status", "seconds", "log"), line.rstrip("\n").split("\t")))
                for line in handle if line.strip()]
    return ["## Steps", ""] + table(rows, ["step", "status", "seconds", "log"]) + [""]


def summarize(folder: str, steps: Optional[str]) -> str:
    csvs = find_csvs([folder])
    lines = ["# Benchmark suite", ""]
    first = next((read_csv(p)[0] for p in csvs.values() if read_csv(p)), None)
    if first:
        lines += ["Machine: " + ", ".join(f"{k} {first.get(k, '?')}" for k in ENVIRONMENT), ""]
    if any(stem.endswith(".smoke") for stem in csvs):
        lines += ["**Smoke run** (no GPU, or --smoke): tiny shapes, one repetition, CPU "
                  "figures. These are not results.", ""]
    lines += steps_table(steps)
    layer = [r for stem, p in csvs.items() if stem.startswith("moe_layer") for r in
             latest(read_csv(p), KEYS["moe_layer"])]
    lines += ["## Targets (MoE layer forward + backward, mm1-7b-moe)", ""] + targets(layer) + [""]
    for stem, path in sorted(csvs.items()):
        name = stem.replace(".smoke", "")
        rows = read_csv(path)
        if not rows:
            continue
        if name in KEYS:
            rows = latest(rows, KEYS[name])
        columns = COLUMNS.get(name) or [c for c in rows[0] if c not in ENVIRONMENT]
        lines += [f"## {stem} ({os.path.basename(path)})", ""] + table(rows, columns) + [""]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="folder of benchmark CSVs")
    parser.add_argument("--steps", help="steps.tsv of a suite run (default: FOLDER/steps.tsv)")
    parser.add_argument("--out", help="markdown file (default: FOLDER/summary.md)")
    args = parser.parse_args(argv)
    text = summarize(args.folder, args.steps or os.path.join(args.folder, "steps.tsv"))
    out = args.out or os.path.join(args.folder, "summary.md")
    with open(out, "w", encoding="utf-8") as handle:
        handle.write(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
