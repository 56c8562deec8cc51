"""Train (or resume) as ``run_train.py`` does, then move Adam's state between checkpoints and
optimizer kinds in the same process group, writing each rank's Adam state after every move.

Not a test module: ``test_distributed_optimizer_resume.py`` runs it under
``torch.distributed.run``.

    python tests/distributed/run_adam_moves.py --config C --out RESULT.json \\
        [--dump DIR] [--more N] [--move KIND[+train]:CHECKPOINT:DUMP_DIR[:SAVE_DIR]] ... \\
        [key=value ...]

After ``train(config)`` (which resumes, trains up to ``train.steps`` and saves as configured):
``--dump`` writes the trained optimizer's Adam state, ``--more N`` trains N further steps; then
each ``--move`` builds a fresh Trainer with ``train.distributed_optimizer`` set by KIND
(``distributed`` or ``plain``), loads CHECKPOINT, writes its Adam state to DUMP_DIR, with
SAVE_DIR saves (under SAVE_DIR/checkpoints), and with ``+train`` then trains ``--more`` steps.
Adam state: ``DIR/rank<r>.pt``, this rank's ``adam_state_pieces``. The result (rank 0): the
losses of ``train`` and of each ``--more``.

Nothing heavy is imported at module level: each rank's first save spawns a helper process
(dist_checkpointing's results queue) that re-imports this module, and importing mm1_moe there
would cost ~2 CPU-seconds per rank for nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def write_adam_state(trainer, folder: str) -> None:
    import torch
    import torch.distributed as dist

    from mm1_moe.training.optimizer_state import adam_state_pieces

    os.makedirs(folder, exist_ok=True)
    pieces = adam_state_pieces(trainer.model, trainer.optimizer)
    torch.save(pieces, os.path.join(folder, f"rank{dist.get_rank()}.pt"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dump")
    parser.add_argument("--more", type=int, default=0)
    parser.add_argument("--move", action="append", default=[])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from mm1_moe.runtime import setup_process

    setup_process()  # once per process: mm1_moe/runtime/process.py
    from mm1_moe.config import load_config
    from mm1_moe.training.loop import Trainer, train

    result = {"more": {}}

    def more(trainer, name: str) -> None:
        if args.more:
            result["more"][name] = [trainer.train_step().loss for _ in range(args.more)]

    def finish(trained) -> None:
        if args.dump:
            write_adam_state(trained, args.dump)
        more(trained, "trained")
        for move in args.move:
            kind, source, dump, *save = move.split(":")
            kind, _, then = kind.partition("+")
            assert kind in ("distributed", "plain") and then in ("", "train"), move
            out = save[0] if save else os.path.join(dump, "run")
            config = load_config(args.config, [
                *args.overrides, f"train.output_dir={out}",
                f"train.distributed_optimizer={'true' if kind == 'distributed' else 'false'}"])
            trainer = Trainer(config, trained.runtime)
            trainer.load(source)
            write_adam_state(trainer, dump)
            if save:
                trainer.save()
            if then:
                more(trainer, move)

    result["losses"] = train(load_config(args.config, args.overrides), on_finish=finish).losses
    if int(os.environ.get("RANK", "0")) == 0:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(result, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
