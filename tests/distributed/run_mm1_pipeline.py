"""One MM1 forward/backward step with images on Megatron's schedule; write the loss and every
parameter's gradient norm as JSON (rank 0).

Not a test module: ``test_mm1_pipeline.py`` runs it as one process (the PP=1 baseline) and under
``torch.distributed.run`` with ``parallel.pipeline_parallel=2`` (encoder + connector + decoder
layers 0-1 on rank 0, layers 2-3 on rank 1), optionally interleaved.

    python tests/distributed/run_mm1_pipeline.py [--out PATH] [dotted.key=value ...]

The model is ``configs/tiny-dense.yaml`` (ViT 56 px / patch 14 -> 16 patches, C-Abstractor to 4
tokens); chunks are MM1Model instances built here (pre/post_process from parallel_state),
layout-invariantly initialised, wrapped in Megatron's DDP, and driven by
``get_forward_backward_func()`` with ``finalize_model_grads``. Gradient norms are keyed by the
global, layout-independent parameter name and cover whole tensors (tensor-parallel shards are
combined), so ``parallel.tensor_parallel=2`` compares too.
"""

from __future__ import annotations

import os
import sys
from mm1_moe.runtime import setup_process  # noqa: E402

setup_process()  # once per process: mm1_moe/runtime/process.py

import argparse  # noqa: E402
import json  # noqa: E402
from functools import partial  # noqa: E402
from typing import Dict, List  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "tiny-dense.yaml")
IMAGE_TOKEN = 255  # the last id of the tiny vocab (256); text tokens are drawn below it
SEQ, MICRO_BATCH = 32, 2
# Images per sequence in each micro-batch: two images in one sequence, a text-only sequence,
# and one image in each.
IMAGES_PER_SEQUENCE = [[2, 0], [1, 1]]


def micro_batches(config) -> List[Dict[str, torch.Tensor]]:
    """The same deterministic micro-batches on every rank and layout."""
    generator = torch.Generator().manual_seed(1234)
    V, image_size = config.model.connector.num_tokens, config.model.vision.image_size
    out = []
    for per_seq in IMAGES_PER_SEQUENCE:
        tokens = torch.randint(0, IMAGE_TOKEN, (MICRO_BATCH, SEQ), generator=generator)
        for b, n in enumerate(per_seq):
            for k in range(n):  # image k of sequence b at positions 2 + k * (V + 3)
                start = 2 + k * (V + 3)
                tokens[b, start:start + V] = IMAGE_TOKEN
        labels = torch.randint(0, IMAGE_TOKEN, (MICRO_BATCH, SEQ), generator=generator)
        images = torch.randn(sum(per_seq), 3, image_size, image_size, generator=generator)
        out.append(dict(tokens=tokens, labels=labels,
                        loss_mask=(tokens != IMAGE_TOKEN).float(),
                        position_ids=torch.arange(SEQ).expand(MICRO_BATCH, -1).contiguous(),
                        images=images, images_per_sequence=torch.tensor(per_seq)))
    return out


def forward_step(data_iterator, model):
    from mm1_moe.training.loop import masked_lm_loss

    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], labels=batch["labels"],
                   images=batch["images"], images_per_sequence=batch["images_per_sequence"],
                   padding_mask=batch["loss_mask"] > 0)
    return output, partial(masked_lm_loss, batch["loss_mask"])


def build_chunks(config, image_token_id: int):
    from megatron.core import parallel_state as ps

    from mm1_moe.config.megatron import decoder_transformer_config
    from mm1_moe.models.init import layout_invariant_init_
    from mm1_moe.models.mm1 import MM1Model

    transformer_config = decoder_transformer_config(config, use_cpu_initialization=True)
    vpp = config.parallel.virtual_pipeline
    chunks = []
    for vp in range(vpp or 1):
        stage = vp if vpp else None
        chunks.append(MM1Model(
            config, transformer_config,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            pp_rank=ps.get_pipeline_model_parallel_rank(), vp_stage=stage,
            image_token_id=image_token_id))
    layout_invariant_init_(chunks, config)
    return chunks


def global_grad_norms(chunks) -> Dict[str, float]:
    """{global parameter name: norm of its whole (DDP main) gradient} of this rank's chunks:
    decoder layers renumbered to their global index, tensor-parallel shards' squared norms
    summed over the tensor-parallel group (one all-reduce; every TP rank calls it)."""
    from megatron.core import parallel_state as ps

    names, squares, sharded = [], [], []
    for chunk in chunks:
        model = chunk.module
        renumber = {f"language_model.decoder.layers.{i}.": f"language_model.decoder.layers.{layer.layer_number - 1}."
                    for i, layer in enumerate(model.language_model.decoder.layers)}
        for name, param in model.named_parameters():
            for local, global_ in renumber.items():
                if name.startswith(local):
                    name = global_ + name[len(local):]
                    break
            names.append(name)
            squares.append(param.main_grad.double().square().sum())
            sharded.append(bool(getattr(param, "tensor_model_parallel", False)))
    local = torch.stack(squares)
    summed = local.clone()
    dist.all_reduce(summed, group=ps.get_tensor_model_parallel_group())
    norms = torch.where(torch.tensor(sharded), summed, local).sqrt()
    return dict(zip(names, norms.tolist()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("MM1_RESULT"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mm1_moe.config import load_config
    from mm1_moe.models.builder import wrap_ddp
    from mm1_moe.runtime import initialize, shutdown

    config = load_config(CONFIG, [f"data.seq_length={SEQ}", f"train.micro_batch_size={MICRO_BATCH}",
                                  *args.overrides])
    initialize(config)
    try:
        chunks = wrap_ddp(config, build_chunks(config, IMAGE_TOKEN))
        for chunk in chunks:
            chunk.config.finalize_model_grads_func = finalize_model_grads
            chunk.config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
            chunk.zero_grad_buffer()
        batches = micro_batches(config)
        iterators = [iter(batches) for _ in chunks]
        losses = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(batches), seq_length=SEQ, micro_batch_size=MICRO_BATCH,
            forward_only=False)
        loss = torch.zeros(2, dtype=torch.float64)
        if ps.is_pipeline_last_stage(ignore_virtual=True) and losses:
            loss[0], loss[1] = sum(float(x["lm_loss"]) for x in losses) / len(losses), 1.0
        gathered: List[Dict[str, float]] = [None] * dist.get_world_size()  # type: ignore
        dist.all_reduce(loss)
        dist.all_gather_object(gathered, global_grad_norms(chunks))
        if dist.get_rank() == 0:
            norms = {k: v for part in gathered for k, v in part.items()}
            text = json.dumps({"loss": float(loss[0] / loss[1]), "grad_norms": norms})
            if args.out:
                with open(args.out, "w", encoding="utf-8") as handle:
                    handle.write(text)
            else:
                print(text, flush=True)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
