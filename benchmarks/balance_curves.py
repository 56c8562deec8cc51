"""Expert load over training steps under each balance mode, on data that makes the router prefer
a few experts: the curves behind the README's "Choosing a balance mode".

    python benchmarks/balance_curves.py [--steps 300] [--csv benchmarks/results/balance_curves.csv]

Set-up (one MoE layer, one process, CPU, ``kernels.moe: torch``): E = 8 experts, top-2, width
64, T = 1,024 tokens per step. The tokens share a mean direction u (x = N(0, I) + 2u) and the
router starts with rows N(0, 0.15) plus 0.5u for experts 0 and 1: they take 2 x 1.0 logits of
preference on every token, a router that has learned to prefer them. The layer learns to map x to
a fixed random linear function of x (MSE), Adam at lr 1e-4 (an LLM's order) on every weight,
the aux-loss coefficient at its default (0.01), the bias rate at DeepSeek-V3's 1e-3. After each
step the expert bias moves (``update_expert_biases``) and the load's coefficient of variation
is recorded (rows per expert over the step's tokens; ~0.04 is the sampling noise of 2,048 rows).

A CPU run's curve is a property of the optimisation, not of the hardware: the same on any
machine (seeded), and it takes seconds per mode.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from mm1_moe.runtime import setup_process  # noqa: E402

setup_process()

import torch  # noqa: E402

MODES = ("aux_loss", "bias", "both")
EXPERTS, TOKENS, SKEW, ROUTER_STD, LR = 8, 1024, 0.5, 0.15, 1e-4


def load_cv_curve(balance: str, steps: int, seed: int = 0) -> List[float]:
    """The load CV after each of ``steps`` steps with ``model.decoder.moe.balance=balance``."""
    from mm1_moe.config import load_config
    from mm1_moe.config.megatron import decoder_transformer_config
    from mm1_moe.moe import MoELayer
    from mm1_moe.moe.balance import update_expert_biases
    from mm1_moe.runtime import initialize, shutdown

    config = load_config(os.path.join(REPO, "configs", "tiny-moe.yaml"),
                         [f"model.decoder.moe.num_experts={EXPERTS}",
                          f"model.decoder.moe.balance={balance}"])
    moe = config.model.decoder.moe
    initialize(config)
    try:
        tc = decoder_transformer_config(config, use_cpu_initialization=True)
        torch.manual_seed(seed)
        layer = MoELayer(tc, moe, kernels="torch")
        D = tc.hidden_size
        g = torch.Generator().manual_seed(seed)
        u = torch.randn(D, generator=g)
        u /= u.norm()
        with torch.no_grad():
            layer.router.weight.normal_(0.0, ROUTER_STD, generator=g)
            layer.router.weight[:2] += SKEW * u
        target = torch.randn(D, D, generator=g) / D ** 0.5
        optimizer = torch.optim.Adam(layer.parameters(), lr=LR)
        curve = []
        for _ in range(steps):
            layer.balance.start_step()
            x = torch.randn(TOKENS, D, generator=g) + 2.0 * u
            out, _ = layer(x.view(TOKENS, 1, D))
            loss = (out.view(TOKENS, D) - x @ target).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            update_expert_biases([layer], moe.bias_update_rate)
            curve.append(layer.metrics.read().summary()["load_cv"])
        return curve
    finally:
        shutdown()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--csv", default=None, help="write step, and one CV column per mode")
    args = parser.parse_args(argv)
    curves: Dict[str, List[float]] = {mode: load_cv_curve(mode, args.steps) for mode in MODES}
    for mode, curve in curves.items():
        below = next((i + 1 for i, v in enumerate(curve) if v < 0.1), None)
        marks = "  ".join(f"{s}:{curve[s - 1]:.3f}" for s in (1, 50, 100, 150, 200, 300)
                          if s <= len(curve))
        print(f"{mode:9s} load CV by step  {marks}   first below 0.1: "
              f"{below if below else 'never'}; mean of the last 50: "
              f"{sum(curve[-50:]) / len(curve[-50:]):.3f}")
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", *MODES])
            for step in range(args.steps):
                writer.writerow([step + 1, *(f"{curves[m][step]:.4f}" for m in MODES)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
