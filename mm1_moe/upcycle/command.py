"""``mm1-moe upcycle``: the command line of ``upcycle`` (wired into ``mm1_moe/cli.py``).

  mm1-moe upcycle --from DENSE --config MOE_YAML --out DIR [options] [dotted.key=value ...]
  torchrun --nproc-per-node N -m mm1_moe.cli upcycle ...   (each rank converts its own part of
                                                           the MoE config's TP/PP/EP layout)

Exit status: 0 done (exact, or approximate as the options imply: the report says which);
1 the function check failed where exact preservation was expected (no checkpoint written);
2 a bad request (missing source, an MoE source, shapes that differ, inconsistent G / E / K / F).
"""

from __future__ import annotations

import argparse
import os

from ..config import load_config


def add_parser(sub) -> argparse.ArgumentParser:
    """Add the ``upcycle`` sub-command to ``mm1-moe``'s sub-parsers."""
    p = sub.add_parser("upcycle", description=__doc__.split("\n\n")[0],
                       help="turn a dense checkpoint into an MoE one (function-preserving)")
    p.add_argument("--from", dest="source", required=True,
                   help="dense checkpoint (step folder, checkpoints folder or run folder; any "
                        "parallel layout) or Hugging Face Llama folder")
    p.add_argument("--config", required=True, help="YAML config of the MoE model")
    p.add_argument("--out", required=True, help="output run folder (checkpoints/step_00000000, "
                                                "config.yaml, upcycle.json)")
    p.add_argument("--router-init", choices=("zero", "random"), default="zero",
                   help="zero: uniform probabilities (exact for every routing order); random: "
                        "N(0, --router-std) per copy (exact with normalized top-k)")
    p.add_argument("--router-std", type=float, default=0.02)
    p.add_argument("--granularity", type=int, default=1,
                   help="split each dense FFN into G expert shards (expert_ffn_hidden_size = F/G)")
    p.add_argument("--no-scale-weights", dest="scale_weights", action="store_false",
                   help="do not scale expert w2 to match the dense output magnitude")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the logits comparison with the dense model")
    p.add_argument("--drop-ratio", type=float, default=0.0,
                   help="Drop-Upcycling: re-initialise this fraction of each expert's "
                        "intermediate units (0.5 in the paper; 0 = plain copies). The function "
                        "is then not preserved: the check reports how far the logits move")
    p.add_argument("--carry-optimizer", action="store_true",
                   help="start Adam from the dense checkpoint's moments (default: fresh)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the MoE config")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from .api import upcycle

    # UpcycleError, InteropError, ConfigError, CheckpointError: the CLI's error boundary prints
    # them as one line and exits 2 (mm1_moe/cli.py)
    config = load_config(args.config, args.overrides)
    report = upcycle(args.source, config, args.out, router_init=args.router_init,
                     router_std=args.router_std, granularity=args.granularity,
                     scale_weights=args.scale_weights, verify=args.verify,
                     carry_optimizer=args.carry_optimizer, drop_ratio=args.drop_ratio,
                     log=lambda msg: print(f"mm1-moe upcycle: {msg}", flush=True))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun: once, from rank 0
        print(report.summary(), flush=True)
        if report.ok and report.checkpoint:
            print(f"continue with: mm1-moe train --config "
                  f"{os.path.join(args.out, 'config.yaml')}", flush=True)
    return 0 if report.ok else 1
