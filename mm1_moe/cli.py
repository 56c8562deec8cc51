"""``mm1-moe``: the command line.

  mm1-moe train [--config YAML] [dotted.key=value ...]    train (also under torchrun)
  mm1-moe info  --config YAML [--tp N --pp N --ep N --dp N] [--json] [--family]
  mm1-moe data inspect SHARD|FOLDER|YAML
  mm1-moe bench experts|layer|step|kernels|attention|rmsnorm|data|threads|plot [ARGS] (checkout)
  mm1-moe kernels report [--target sm90|sm80] [--config YAML] [--json]
  mm1-moe upcycle --from DENSE --config MOE_YAML --out DIR [options] [dotted.key=value ...]

Without ``--config``, ``train`` runs the embedded default (``configs/default.yaml``, shipped in
the package as ``mm1_moe/default.yaml``): a tiny run on CPU in about a minute.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from typing import List, Optional

from .config import ConfigError, load_config

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.yaml")
FAMILY = ("mm1-3b", "mm1-7b", "mm1-30b", "mm1-3b-moe", "mm1-7b-moe")


def _train(args: argparse.Namespace) -> int:
    config = load_config(args.config or DEFAULT_CONFIG, args.overrides)
    from .training.loop import StepLog, train

    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"mm1-moe train: {config.model.name}, {config.train.steps} steps, resolved config "
              f"in {os.path.join(config.train.output_dir, 'config.yaml')}", flush=True)

    started = time.perf_counter()
    first_step: list = []

    def log(entry: StepLog) -> None:
        first_step.append(entry.step) if not first_step else None
        if entry.step % config.train.log_interval == 0 or entry.step == config.train.steps:
            done = entry.step - first_step[0] + 1
            eta = (time.perf_counter() - started) / done * (config.train.steps - entry.step)
            mfu = f"  mfu {entry.mfu:.1%}" if entry.mfu is not None else ""
            moe = ""
            if entry.moe:
                stats = entry.moe.values()
                moe = (f"  expert load cv {max(s['load_cv'] for s in stats):.2f}"
                       f" max/mean {max(s['load_max_over_mean'] for s in stats):.2f}")
                if any("bias_max" in s for s in stats):
                    low = min(s.get("bias_min", 0.0) for s in stats)
                    high = max(s.get("bias_max", 0.0) for s in stats)
                    moe += f" bias [{low:+.3f}, {high:+.3f}]"
                dropped = sum(s["dropped"] for s in stats)
                if dropped:
                    moe += f" dropped {dropped:,.0f}"
            print(f"step {entry.step:5d}/{config.train.steps}  loss {entry.loss:.4f}  "
                  f"grad_norm {entry.grad_norm:.3f}  lr {entry.lr:.2e}  "
                  f"tokens/s {entry.tokens_per_s:,.0f}{mfu}{moe}  "
                  f"eta {datetime.timedelta(seconds=round(eta))}", flush=True)

    samples: dict = {}
    result = train(config, log=log, on_finish=lambda trainer: samples.update(
        _safe_sample_caption(trainer, rank) or {}))
    if rank == 0 and not result.steps:
        print(f"nothing to train: the run in {config.train.output_dir} is already at step "
              f"{config.train.steps} (train.steps). Raise train.steps, or start afresh with "
              "train.resume=false or another train.output_dir.", flush=True)
    if rank == 0 and result.steps:
        first, last = result.losses[0], result.losses[-1]
        note = ""
        if config.data.source == "synthetic_text":
            from .data import MarkovChain

            floor = MarkovChain.build(config.model.decoder.vocab_size,
                                      config.data.seed).entropy_floor()
            note = f" (the generated data's entropy floor is {floor:.4f})"
        print(f"done: loss {first:.4f} -> {last:.4f} over {len(result.steps)} steps{note}",
              flush=True)
    if rank == 0:
        out = config.train.output_dir
        print(f"checkpoints: {os.path.join(out, 'checkpoints')}\n"
              f"metrics:     {os.path.join(out, 'metrics.jsonl')}", flush=True)
        if samples:
            print(f"sample caption for bundled image {samples['image']}:\n"
                  f"  model:   {samples['model']!r}\n  written: {samples['truth']!r}", flush=True)
    return 0


def _safe_sample_caption(trainer, rank: int) -> Optional[dict]:
    """The closing sample is a courtesy: the run has trained and saved by now, so a failure in
    it is reported and never changes the command's exit code."""
    try:
        return _sample_caption(trainer)
    except Exception as err:  # noqa: BLE001 - any failure here must not fail a finished run
        if rank == 0:
            print(f"warning: the sample caption failed ({type(err).__name__}: {err}); "
                  "training and checkpoints are unaffected", flush=True)
        return None


def _sample_caption(trainer) -> Optional[dict]:
    """A caption for the first bundled image, written by the trained MM1 (one pipeline stage)."""
    config = trainer.config
    if config.model.image_token_id is None or config.parallel.pipeline_parallel != 1 \
            or config.data.source != "mm1_mixture":
        return None
    import torch

    from .data.images import preprocess
    from .data.spec import bundled_dir
    from .generate import first_caption_pair, greedy_caption

    raw, truth, key = first_caption_pair(os.path.join(bundled_dir(), "captions-000000.tar"))
    pixels = torch.from_numpy(preprocess(raw, config.model.vision.image_size))
    model = trainer.model[0].module
    tokenizer = trainer.data.loader.tokenizer
    text = greedy_caption(model, config, tokenizer, pixels, device=trainer.runtime.device)
    return {"image": key, "model": text, "truth": truth}


def _repo_configs_dir() -> Optional[str]:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(here, "configs")
    return path if os.path.isdir(path) else None


def _info(args: argparse.Namespace) -> int:
    from .info import family_table, format_report, info_report

    if args.family:
        folder = args.configs_dir or _repo_configs_dir()
        if folder is None:
            raise ConfigError("--family needs --configs-dir (the folder with mm1-*.yaml)")
        rows = [(n, load_config(os.path.join(folder, f"{n}.yaml"))) for n in FAMILY]
        print(family_table(rows))
        return 0
    if not args.config:
        raise ConfigError("info needs --config YAML (or --family)")
    config = load_config(args.config, args.overrides)
    report = info_report(config, tp=args.tp, pp=args.pp, ep=args.ep, dp=args.dp)
    report["decoder_module_tree"] = _module_tree_check(config, report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        tree = report["decoder_module_tree"]
        print(format_report(report))
        print(f"decoder params from the built module tree: {tree['total']:,} "
              f"({'equals' if tree['matches_formula'] else 'DIFFERS FROM'} the formula)")
    return 0 if report["decoder_module_tree"]["matches_formula"] else 1


def _module_tree_check(config, report) -> dict:
    """Count the decoder as built (on the meta device) and compare with the formula."""
    from .models.counting import decoder_param_counts_from_modules

    tree = decoder_param_counts_from_modules(config)
    params = report["params"]
    formula = params["decoder"] + params["experts"] + params["routers"]
    return {**tree, "formula_total": formula, "matches_formula": tree["total"] == formula}


def _bench(args: argparse.Namespace) -> int:
    from .bench import run_benchmark

    try:
        return run_benchmark(args.mode, args.args)
    except FileNotFoundError as err:
        print(f"mm1-moe bench: {err}", file=sys.stderr)
        return 2


def _data_inspect(args: argparse.Namespace) -> int:
    from .data.inspect import run_inspect

    return run_inspect(args)  # prints the report; DataError/ConfigError -> message, exit 2


def _kernels_report(args: argparse.Namespace) -> int:
    """Every kernel launch of the config's MoE layer, RMSNorm and attentions, compiled for the
    target without a GPU (mm1_moe/kernels/report.py); exit 1 if any launch fails to compile."""
    from .kernel_shapes import kernel_shapes
    from .kernels.report import format_table, kernel_report, report_json

    folder = _repo_configs_dir()
    if not args.config and folder is None:
        raise ConfigError("kernels report needs --config YAML (no configs/ folder here)")
    config = load_config(args.config or os.path.join(folder, "mm1-7b-moe.yaml"), args.overrides)
    rows = kernel_report([kernel_shapes(config)], args.target, candidates=args.candidates)[0]
    if args.json:
        print(json.dumps({"config": config.model.name, "target": args.target,
                          "launches": report_json(rows)}, indent=2, default=str))
    else:
        print(f"{config.model.name} on {args.target}: {len(rows)} launches\n{format_table(rows)}")
    return 1 if any(row.error for row in rows) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mm1-moe", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model (single process or under torchrun)")
    train.add_argument("--config", help="YAML config (default: the embedded tiny default run)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10")
    train.set_defaults(func=_train)

    info = sub.add_parser("info", help="parameters, FLOPs per token and memory per GPU")
    info.add_argument("--config", help="YAML config")
    info.add_argument("--tp", type=int, help="tensor parallel size (default: the config's)")
    info.add_argument("--pp", type=int, help="pipeline parallel size (default: the config's)")
    info.add_argument("--ep", type=int, help="expert parallel size (default: the config's)")
    info.add_argument("--dp", type=int, default=1, help="data parallel size (default 1)")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.add_argument("--family", action="store_true", help="print the MM1 family table")
    info.add_argument("--configs-dir", help="folder of the family configs (for --family)")
    info.add_argument("overrides", nargs="*", help="dotted overrides")
    info.set_defaults(func=_info)

    data = sub.add_parser("data", help="data pipeline tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    insp = data_sub.add_parser("inspect", help="counts, decoded samples, packing efficiency and "
                               "images per sequence of a shard, a folder of shards, or a config")
    insp.add_argument("target", help="tar shard, JSONL/text file, folder of them, or YAML config")
    insp.add_argument("--samples", type=int, default=3, help="decoded samples per file")
    insp.add_argument("--sequences", type=int, default=16, help="sequences to pack")
    insp.add_argument("--tokenizer", help="tokenizer file for shards (default: the bundled one)")
    insp.add_argument("--seq-length", type=int, help="packing of shards (default 4096)")
    insp.add_argument("--max-images", type=int, help="images per sequence (default 16)")
    insp.add_argument("--tokens-per-image", type=int, help="default 144")
    insp.add_argument("--image-size", type=int, help="default 378")
    insp.add_argument("overrides", nargs="*", help="dotted overrides (configs only)")
    insp.set_defaults(func=_data_inspect)

    from .bench import MODES as BENCH_MODES

    bench = sub.add_parser("bench", help="run a benchmark script (benchmarks/ of the checkout)")
    bench.add_argument("mode", choices=list(BENCH_MODES),
                       help="experts | layer: bench_moe_layer.py; step: bench_step.py; kernels, "
                            "attention, data: bench_<name>.py; threads: bench_cpu_threads.py; "
                            "plot: plot.py")
    bench.add_argument("args", nargs=argparse.REMAINDER,
                       help="the script's own options, e.g. --config YAML --tokens 16384 --ep 1 "
                            "--smoke --out DIR (MODE --help lists them)")
    bench.set_defaults(func=_bench)

    kernels = sub.add_parser("kernels", help="static reports on our Triton kernels")
    kernels_sub = kernels.add_subparsers(dest="kernels_command", required=True)
    report = kernels_sub.add_parser(
        "report", help="compile every kernel launch of the MoE layer, RMSNorm and attention at "
                       "the config's shapes for a GPU target (no GPU needed): registers, spills, "
                       "shared memory, MMA kind, TMA, CTAs per SM")
    report.add_argument("--target", choices=["sm90", "sm80"], default="sm90",
                        help="GPU to compile for (default sm90)")
    report.add_argument("--config", help="YAML config (default: configs/mm1-7b-moe.yaml)")
    report.add_argument("--json", action="store_true", help="print one JSON object")
    report.add_argument("--candidates", action="store_true",
                        help="instead, every GPU tile candidate of every op at the config's "
                             "shapes (kernels/tile_candidates.py; bench_tile_sweep.py times them)")
    report.add_argument("overrides", nargs="*", help="dotted overrides")
    report.set_defaults(func=_kernels_report)

    from .upcycle.command import add_parser as add_upcycle_parser

    add_upcycle_parser(sub)
    return parser


def _add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug`` on every (sub)command: show the traceback of an expected error too."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the full traceback of any error (default: a one-line "
                             "message for expected errors)")
    for action in parser._actions:  # argparse has no public walk over subparsers
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_debug_flag(child)


def expected_errors() -> tuple:
    """What a user can cause and fix (bad config, data, checkpoint, Hugging Face folder, upcycle
    source): a message, not a traceback. Anything else is a bug and keeps its traceback."""
    from .data.common import DataError
    from .interop.llama import InteropError
    from .runtime.megatron_patches import UnsupportedMegatron
    from .training.checkpoint import CheckpointError
    from .upcycle.convert import UpcycleError

    return ConfigError, DataError, CheckpointError, InteropError, UpcycleError, UnsupportedMegatron


def report_error(command: str, err: BaseException) -> None:
    """``mm1-moe <command>: <message>`` on rank 0. Other ranks stay quiet for config errors
    (every rank reads the same config) and tag theirs with the rank otherwise (a data or
    checkpoint error may be one rank's alone)."""
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(f"mm1-moe {command}: {err}", file=sys.stderr, flush=True)
    elif not isinstance(err, ConfigError):
        print(f"mm1-moe {command} [rank {rank}]: {err}", file=sys.stderr, flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command. Expected errors print one line and exit 2 on every rank; ``--debug``
    (or ``MM1_MOE_DEBUG=1``) lets them raise with their traceback."""
    from .runtime.process import setup_process

    # once per process, first: building the parser imports the upcycle command, hence Megatron
    setup_process()
    parser = build_parser()
    _add_debug_flag(parser)
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False) or os.environ.get("MM1_MOE_DEBUG") == "1"
    try:
        return args.func(args)
    except expected_errors() as err:
        if debug:
            raise
        report_error(" ".join(filter(None, (args.command, getattr(args, "data_command", None)))),
                     err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
