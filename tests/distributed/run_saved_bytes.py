"""Measure on each rank the bytes autograd saves per dense and per MoE decoder layer of
configs/tiny-moe.yaml (one forward, 1,024 tokens) next to what ``mm1_moe.activations`` plans for
that rank's layout, and write them as JSON (``<out>.rank<R>``). Not a test module:
``test_activation_memory_tp.py`` runs it under ``torch.distributed.run``.

    python tests/distributed/run_saved_bytes.py --out PATH [dotted.key=value ...]
"""

from __future__ import annotations

import os
import sys

from mm1_moe.runtime import setup_process  # noqa: E402

setup_process()  # once per process: mm1_moe/runtime/process.py

import argparse  # noqa: E402
import json  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQ = 1024


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("MM1_RESULT"), required=False)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    import torch
    from mm1_moe.activations import decoder_layer_bytes
    from mm1_moe.config import load_config
    from mm1_moe.models.builder import build_model_chunks
    from mm1_moe.models.saved_memory import SavedBytes, decoder_layer_scopes
    from mm1_moe.runtime import initialize, shutdown

    config = load_config(os.path.join(REPO, "configs", "tiny-moe.yaml"), [
        f"data.seq_length={SEQ}", f"model.decoder.max_position_embeddings={SEQ}",
        "train.micro_batch_size=1", "kernels.attention=sdpa", "kernels.moe=triton",
        "kernels.norm=triton", *args.overrides])
    initialize(config)
    try:
        (model,) = build_model_chunks(config, on_cpu=True)
        scopes = decoder_layer_scopes(model, config)
        tokens = torch.randint(5, 256, (1, SEQ), generator=torch.Generator().manual_seed(0))
        with SavedBytes(model, scopes) as saved:
            model(tokens, torch.arange(SEQ)[None], None, labels=tokens)
        par = config.parallel
        plan = {kind: decoder_layer_bytes(config, kind == "moe", par.tensor_parallel,
                                          par.sequence_parallel, par.expert_parallel).total
                for kind in scopes}
        result = {kind: saved.forward[kind] / len(scopes[kind]) for kind in scopes}
        rank = int(os.environ.get("RANK", "0"))
        with open(f"{args.out}.rank{rank}", "w", encoding="utf-8") as handle:
            json.dump({"measured": result, "planned": plan}, handle)
        if rank == 0:
            with open(args.out, "w", encoding="utf-8") as handle:
                json.dump({"measured": result, "planned": plan}, handle)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
