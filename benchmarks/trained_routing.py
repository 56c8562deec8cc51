"""The expert load a trained router gives: train the default run (``mm1-moe train``'s tiny
MM1-MoE on the bundled images and captions, its 300 steps, on CPU in about three minutes), then
route the bundled data's next batches through it (forward only, eval mode) and write each MoE
layer's rows per expert to ``benchmarks/results/trained_routing.json``. ``bench_moe_layer.py``'s
``trained`` routing replays the most imbalanced layer's sorted profile at a config's shapes.

    python benchmarks/trained_routing.py [--steps 300] [--batches 8] [--balance aux_loss]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from functools import partial

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from mm1_moe.runtime import setup_process  # noqa: E402

setup_process()

OUT = os.path.join(REPO, "benchmarks", "results", "trained_routing.json")


def route_after_training(trainer, batches: int):
    """Each MoE layer's rows per expert over ``batches`` steps' worth of the data that follows
    training (forward only)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mm1_moe.training.loop import forward_step

    for chunk in trainer.model:
        chunk.eval()
    for layer in trainer.moe_layers:
        layer.metrics.reset()
    for _ in range(batches):
        micro = list(trainer.data.next_step())
        get_forward_backward_func()(
            forward_step_func=partial(forward_step, trainer.runtime.device),
            data_iterator=iter(micro), model=trainer.model[0], num_microbatches=len(micro),
            seq_length=micro[0]["tokens"].shape[1], micro_batch_size=micro[0]["tokens"].shape[0],
            forward_only=True)
    return {str(layer.layer_number): layer.metrics.read().tokens_per_expert_E.tolist()
            for layer in trainer.moe_layers}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default run's)")
    parser.add_argument("--batches", type=int, default=8, help="global batches routed after")
    parser.add_argument("--balance", default="aux_loss", choices=["aux_loss", "bias", "both"])
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)

    from mm1_moe.config import load_config
    from mm1_moe.training.loop import train

    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(os.path.join(REPO, "mm1_moe", "default.yaml"),
                             [f"train.steps={args.steps}", f"train.output_dir={tmp}",
                              "train.save_final=false", "train.save_interval=0",
                              f"model.decoder.moe.balance={args.balance}"])
        started = time.time()
        result = train(config, on_finish=lambda t: found.update(
            route_after_training(t, args.batches)))
    layers = {k: [int(c) for c in v] for k, v in found.items()}
    ratios = {k: max(v) / (sum(v) / len(v)) for k, v in layers.items()}
    record = {"config": config.model.name, "steps": args.steps, "balance": args.balance,
              "final_loss": result.losses[-1] if result.losses else None,
              "batches_routed": args.batches, "layers": layers,
              "max_over_mean": {k: round(r, 4) for k, r in ratios.items()},
              "seconds": round(time.time() - started, 1),
              "note": "rows per expert from real tokens (image placeholders and padding left "
                      "out), forward only after training"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
    for k, v in layers.items():
        print(f"layer {k}: rows per expert {v}, max/mean {ratios[k]:.3f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
