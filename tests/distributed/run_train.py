"""Train configs/tiny-dense.yaml (plus dotted overrides) and write rank 0's losses as JSON.

Not a test module (pytest collects ``test_*.py`` only): ``test_parallel_equivalence.py`` runs it
as a single process for the baseline and under ``torch.distributed.run`` for each layout.

    python tests/distributed/run_train.py [--out PATH] [dotted.key=value ...]

The output path is ``--out`` or the environment variable ``MM1_RESULT``; the JSON object holds
``losses``, ``grad_norms``, ``lrs`` and ``moe`` (each MoE layer's routing statistics on logging
steps), one entry per step, ``expert_bias`` (each MoE layer's expert bias at the end, with
``balance: bias|both``), and ``expert_rows``: the rows this rank's experts computed over the run
(every rank writes its own count to ``<out>.rank<R>``; the JSON holds rank 0's).
"""

from __future__ import annotations

import os
import sys

from mm1_moe.runtime import setup_process  # noqa: E402

setup_process()  # once per process: mm1_moe/runtime/process.py

import argparse  # noqa: E402
import json  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "tiny-dense.yaml")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("MM1_RESULT"),
                        help="JSON result path (default: $MM1_RESULT)")
    parser.add_argument("--config", default=CONFIG, help="YAML config (default: tiny-dense)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=4")
    args = parser.parse_args(argv)

    from mm1_moe.config import load_config
    from mm1_moe.training.loop import train

    import torch
    from mm1_moe.moe.experts import GroupedSwiGLUExperts

    rows = [0]

    def count_rows(module, inputs, output):
        if isinstance(module, GroupedSwiGLUExperts):
            rows[0] += int(inputs[1][-1])  # offsets_e1[-1]: the rows handed to the experts

    hook = torch.nn.modules.module.register_module_forward_hook(count_rows)
    config = load_config(args.config, args.overrides)
    biases = {}

    def read_biases(trainer) -> None:  # balance: bias|both: each MoE layer's bias at the end
        for layer in trainer.moe_layers:
            if layer.router.expert_bias is not None:
                biases[str(layer.layer_number)] = layer.router.expert_bias.tolist()

    try:
        result = train(config, on_finish=read_biases)
    finally:
        hook.remove()
    rank = int(os.environ.get("RANK", "0"))
    if args.out:
        with open(f"{args.out}.rank{rank}", "w", encoding="utf-8") as handle:
            handle.write(str(rows[0]))
    if rank == 0:
        payload = {
            "losses": result.losses,
            "grad_norms": [s.grad_norm for s in result.steps],
            "lrs": [s.lr for s in result.steps],
            # per step: {layer number: routing statistics} (logging steps only)
            "moe": [{str(k): v for k, v in s.moe.items()} for s in result.steps],
            "expert_rows": rows[0],
            "expert_bias": biases,  # rank 0's layers (all of them without pipelining)
        }
        text = json.dumps(payload)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w", encoding="utf-8") as handle:
                handle.write(text)
        else:
            print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
