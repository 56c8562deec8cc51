"""A training step of a shrunk MM1-MoE with images, on one GPU: tokens/s and MFU, with dropless
and with forced-balanced routing.

The model is ``configs/mm1-7b-moe.yaml`` cut to fit one 80 GB GPU with the full training state
(bf16 weights, fp32 grads, fp32 master weights and Adam moments: ~18 bytes per parameter): the
real widths everywhere (decoder D 4096, F 12288, 32 heads of 128; ViT-H/14 at 378 px, 32 layers;
the C-Abstractor to 144 tokens per image), but 4 decoder layers (MoE every 2nd: 2 dense + 2 MoE)
with 4 experts, top-2: the experts one GPU holds of each MM1-7B-MoE layer at EP=8. About 2.7 B
parameters; ``mm1-moe info`` estimates ~45 GiB of weights and optimizer state plus activations
(flash attention keeps them to a few GiB at 4096 tokens).

One step = ``Trainer.train_step`` (mm1_moe.training.loop): Megatron's forward-backward schedule
over the micro-batches, DP grad finalisation, the optimizer step. Each micro-batch is one packed
sequence of ``data.seq_length`` tokens holding ``--images`` images (144 placeholder tokens
each, the rest random text), generated once on the device, so data loading is not timed
(``bench_data.py`` measures the loader).

Metrics: tokens/s (sequence tokens per second, images' placeholders included); TFLOP/s from
``mm1_moe.info.flops_per_token(...)["training_total"]`` (6 x active decoder matmul parameters +
causal attention + the ViT and connector per image, amortised at ``--images`` per sequence);
``mfu`` over the dense matmul rate measured in this run, ``mfu_peak`` over the datasheet peak
(``training.metrics.PEAK_TFLOPS``); peak memory over the timed steps.

  python benchmarks/bench_step.py                      # on a GPU
  python benchmarks/bench_step.py --smoke              # tiny MM1 on CPU (what the tests run)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from typing import Dict, Iterator, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402
from moe_setup import DEFAULT_CONFIG, balance_ours, peak_memory_gib  # noqa: E402

# The tiny MM1 of the CPU tests (configs/tiny-moe.yaml's sizes) on the config's MoE settings.
SMOKE_OVERRIDES = [
    "model.decoder.hidden_size=64", "model.decoder.num_attention_heads=4",
    "model.decoder.num_query_groups=2", "model.decoder.ffn_hidden_size=128",
    "model.decoder.moe.expert_ffn_hidden_size=null", "model.decoder.vocab_size=256",
    "model.decoder.max_position_embeddings=128",
    "model.vision.image_size=56", "model.vision.patch_size=14", "model.vision.width=32",
    "model.vision.depth=2", "model.vision.num_heads=2", "model.vision.mlp_dim=64",
    "model.connector.hidden_size=32", "model.connector.depth=1", "model.connector.num_tokens=4",
]


def step_config(config_path: str, smoke: bool, layers: int, experts: int, images: int,
                seq_length: Optional[int], micro_batches: int, output_dir: str):
    """The shrunk MM1 (see the module docstring) on one process."""
    from mm1_moe.config import load_config

    base = load_config(config_path)
    vocab = 256 if smoke else base.model.decoder.vocab_size
    seq = seq_length or (64 if smoke else base.data.seq_length)
    overrides = [
        f"train.dtype={'bf16' if harness.on_gpu() else 'fp32'}", "parallel.tensor_parallel=1",
        "parallel.pipeline_parallel=1", "parallel.virtual_pipeline=null",
        "parallel.expert_parallel=1", "parallel.sequence_parallel=false",
        f"model.name={base.model.name}-shrunk-l{layers}-e{experts}{'-smoke' if smoke else ''}",
        f"model.decoder.num_layers={layers}", "model.decoder.moe.layer_freq=2",
        f"model.decoder.moe.num_experts={experts}", f"model.image_token_id={vocab - 1}",
        f"data.seq_length={seq}", f"data.max_images_per_sequence={images}",
        "train.micro_batch_size=1", f"train.global_batch_size={micro_batches}",
        "train.log_interval=1000000", f"train.output_dir={output_dir}",
        "train.save_final=false", "train.resume=false", "model.layout_invariant_init=false",
    ]
    return load_config(config_path, overrides + (SMOKE_OVERRIDES if smoke else []))


class SyntheticImageBatches:
    """Trainer data: the same ``micro_batches`` packed sequences every step, made once on the
    device. Sequence: random text ids below ``image_token_id``; image k's V placeholders start
    at k * (S // images) + 1; loss on text tokens only."""

    def __init__(self, config, device: torch.device):
        V = config.model.connector.num_tokens
        S, n = config.data.seq_length, config.data.max_images_per_sequence
        if n * (V + 1) > S:
            raise ValueError(f"{n} images of {V} tokens do not fit {S} tokens (data.seq_length)")
        token, size = config.model.image_token_id, config.model.vision.image_size
        gen = torch.Generator(device=device).manual_seed(0)
        self.batches = []
        for _ in range(config.train.global_batch_size):
            tokens = torch.randint(0, token, (1, S), device=device, generator=gen)
            for k in range(n):
                start = k * (S // n) + 1
                tokens[0, start:start + V] = token
            self.batches.append({
                "tokens": tokens,
                "labels": torch.randint(0, token, (1, S), device=device, generator=gen),
                "loss_mask": (tokens != token).float(),
                "position_ids": torch.arange(S, device=device)[None],
                # float32, CLIP-normalised-like, as the loader yields them (the ViT casts)
                "images": torch.randn(n, 3, size, size, device=device, generator=gen),
                "images_per_sequence": torch.tensor([n], device=device),
            })
        self.step = 0

    def next_step(self) -> Iterator[Dict[str, torch.Tensor]]:
        self.step += 1
        return iter(self.batches)


def _timed_steps(trainer, warmup: int, steps: int) -> Dict[str, object]:
    """Median seconds of ``steps`` optimizer steps after ``warmup``; each step ends in a host
    sync (the loss is read), so wall-clock time is the step's time."""
    for _ in range(warmup):
        trainer.train_step()
    times, losses = [], []

    def run() -> None:
        for _ in range(steps):
            start = time.perf_counter()
            losses.append(trainer.train_step().loss)
            times.append(time.perf_counter() - start)

    peak = peak_memory_gib(run)
    return {"step_s": statistics.median(times), "loss": losses[-1], "peak_gib": peak}


def bench_step(config_path: str = DEFAULT_CONFIG, smoke: bool = False, layers: int = 4,
               experts: int = 4, images: int = 4, seq_length: Optional[int] = None,
               micro_batches: int = 2, ceil=None) -> List[Dict[str, object]]:
    """Rows for the dropless and the balanced step of the shrunk MM1."""
    from mm1_moe.info import flops_per_token, param_counts
    from mm1_moe.runtime import initialize, shutdown
    from mm1_moe.training.loop import Trainer
    from mm1_moe.training.metrics import device_peak_tflops

    out_dir = tempfile.mkdtemp(prefix="bench_step_")
    config = step_config(config_path, smoke, layers, experts, images, seq_length, micro_batches,
                         out_dir)
    runtime = initialize(config)
    try:
        ceil = ceil or harness.ceilings(smoke)
        trainer = Trainer(config, runtime)
        trainer.data = SyntheticImageBatches(config, runtime.device)
        tokens = config.train.global_batch_size * config.data.seq_length
        flops = flops_per_token(config)["training_total"] * tokens
        peak = device_peak_tflops(config.train.peak_tflops)
        counts = param_counts(config)
        base = {"bench": "step", "config": config.model.name, "layers": layers,
                "experts": experts, "images_per_seq": images, "seq_length": config.data.seq_length,
                "micro_batches": micro_batches, "tokens": tokens, "params": counts.total,
                "active_params": counts.active, "dtype": config.train.dtype}
        rows = []
        warmup, steps = (1, 1) if smoke else (2, 3)
        for routing in ("dropless", "balanced"):
            if routing == "balanced":
                for layer in trainer.moe_layers:
                    balance_ours(layer)
            row = {**base, "impl": "ours", "routing": routing,
                   **_timed_steps(trainer, warmup, steps)}
            row["tokens_per_s"] = tokens / row["step_s"]
            row["tflops"] = flops / row["step_s"] / 1e12
            row["mfu"] = row["tflops"] / ceil.matmul_tflops
            row["mfu_peak"] = row["tflops"] / peak if peak else "n/a"
            rows.append(row)
        return rows
    finally:
        shutdown()
        import shutil

        shutil.rmtree(out_dir, ignore_errors=True)


COLUMNS = ["config", "layers", "experts", "images_per_seq", "seq_length", "micro_batches",
           "routing", "step_s", "tokens_per_s", "tflops", "mfu", "mfu_peak", "peak_gib", "loss"]


def main(argv: Optional[List[str]] = None) -> int:
    parser = harness.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="the YAML config to shrink")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (MoE every 2nd)")
    parser.add_argument("--experts", type=int, default=4, help="experts per MoE layer")
    parser.add_argument("--images", type=int, default=4, help="images per sequence")
    parser.add_argument("--seq-length", type=int, help="tokens per sequence (default: config's)")
    parser.add_argument("--micro-batches", type=int, default=2, help="sequences per step")
    args = parser.parse_args(argv)
    smoke = args.smoke or not harness.on_gpu()
    ceil = harness.ceilings(smoke)
    print(f"ceilings: copy {ceil.copy_gbps:.1f} GB/s, matmul {ceil.matmul_tflops:.3f} TFLOP/s"
          f"{'  (smoke: CPU figures, never GPU figures)' if smoke else ''}", flush=True)
    images = min(args.images, 2) if smoke else args.images
    rows = bench_step(args.config, smoke, args.layers, args.experts, images, args.seq_length,
                      args.micro_batches, ceil)
    print("step of the shrunk MM1 with images (ours: Triton MoE and attention kernels)")
    harness.print_table(rows, COLUMNS)
    harness.save_results("step", rows, args, smoke, ceil)
    return 0


if __name__ == "__main__":
    sys.exit(main())
