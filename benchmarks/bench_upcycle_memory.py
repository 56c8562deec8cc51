"""Peak resident memory of upcycling: one process against N ranks that each convert their own
part (``torchrun ... mm1_moe.cli upcycle``), on a config sized so that weights dominate.

It trains a dense model for one step (the source checkpoint), then upcycles it into an MoE with
E experts in every layer twice: in one process, and on ``--ranks`` ranks with expert parallelism
``--ranks``. Each upcycle records, per rank, the peak resident memory at the start (runtime up,
no model yet) and over the whole run, and the rank's share: its parameters x (fp32 weights +
fp32 grads + fresh Adam moments) = 16 bytes each. Printed per path: the growth over the start
against that share (the aim: within 1.5x on every rank). CPU figures of this machine.

    python benchmarks/bench_upcycle_memory.py [--ranks 4] [--hidden 1024] [--experts 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results", "upcycle_memory.csv")


def _run(argv: List[str], ranks: int = 1) -> None:
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
    proc = subprocess.run([*launcher, "-m", "mm1_moe.cli", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"$ {' '.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args()
    D = args.hidden
    shape = [f"model.decoder.hidden_size={D}", f"model.decoder.ffn_hidden_size={4 * D}",
             "model.decoder.num_attention_heads=8", "model.decoder.num_query_groups=8",
             f"model.decoder.num_layers={args.layers}", "data.seq_length=64"]
    moe = [*shape, f"model.decoder.moe.num_experts={args.experts}",
           "model.decoder.moe.layer_freq=1", "train.micro_batch_size=1",
           f"train.global_batch_size={args.ranks}"]
    rows: List[Dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        dense = os.path.join(tmp, "dense")
        _run(["train", "--config", "configs/tiny-dense.yaml", f"train.output_dir={dense}",
              "train.steps=1", "train.micro_batch_size=1", "train.global_batch_size=1", *shape])
        for ranks in (1, args.ranks):
            out = os.path.join(tmp, f"moe-{ranks}")
            parallel = [f"parallel.expert_parallel={ranks}"] if ranks > 1 else []
            _run(["upcycle", "--from", dense, "--config", "configs/tiny-moe.yaml", "--out", out,
                  *moe, *parallel], ranks)
            with open(os.path.join(out, "upcycle.json"), encoding="utf-8") as handle:
                report = json.load(handle)
            for rank, (start, peak, share) in enumerate(zip(
                    report["start_rss_mib"], report["peak_rss_mib"], report["shard_mib"])):
                rows.append({"ranks": ranks, "rank": rank, "start_mib": start, "peak_mib": peak,
                             "growth_mib": round(peak - start, 1), "share_mib": share,
                             "growth_over_share": round((peak - start) / share, 2)})
    header = list(rows[0])
    print(f"upcycle memory: D={D}, {args.layers} layers, {args.experts} experts in every layer "
          "(CPU figures)")
    print("  ".join(f"{h:>17}" for h in header))
    for row in rows:
        print("  ".join(f"{row[h]!s:>17}" for h in header))
    if not args.no_csv:
        os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
        with open(RESULTS, "w", encoding="utf-8") as handle:
            handle.write(",".join(["hidden", "layers", "experts", *header]) + "\n")
            for row in rows:
                handle.write(",".join(str(x) for x in [D, args.layers, args.experts,
                                                       *row.values()]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
