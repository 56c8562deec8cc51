"""``upcycle``: a dense checkpoint (ours or a Hugging Face Llama folder) -> an MoE checkpoint that
starts where the dense model ended, checked for function preservation.

Everything runs in one process at TP = PP = EP = 1 on global tensors (``convert.py``), so any
dense layout (a TP2 or PP2/VPP checkpoint reshards into the single-process dense model on load)
upcycles into any MoE layout (the step-0 checkpoint reshards again when training loads it).
The cost is the whole dense and MoE model in one process's memory.

Output folder (a run folder, as ``mm1-moe train`` writes one):
  <out>/checkpoints/step_00000000/   model, fresh (or carried) optimizer, scheduler, data position
  <out>/config.yaml                  the MoE config with train.output_dir = <out>
  <out>/upcycle.json                 the report (also written when verification fails)
Continue with ``mm1-moe train --config <out>/config.yaml`` (resumes in <out>), or with any run
folder and ``train.load_from=<out>/checkpoints``.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from ..config import Config, dump_config, validate
from ..models.builder import build_model_chunks
from ..models.init import fill_from_global_
from ..runtime import initialize, shutdown
from ..training.checkpoint import complete_checkpoints
from .carry import carried_state_fn, read_dense_optimizer
from .convert import (
    UpcycleError,
    UpcyclePlan,
    check_same_decoder,
    expected_exact,
    make_plan,
    upcycle_state_dict,
)
from .save import fresh_optimizer_state_, write_checkpoint
from .source import (
    DenseSource,
    dense_config,
    global_state_dict,
    load_source_,
    read_hf_llama,
    resolve_source,
    single_process_config,
)
from .verify import ATOL, BF16_RTOL, compare

REPORT = "upcycle.json"


@dataclass
class UpcycleReport:
    """What ``upcycle`` did. ``ok`` is False only when verification ran, exact preservation was
    expected, and the logits differ beyond the tolerance (then no checkpoint is written)."""

    source: str
    source_kind: str
    out_dir: str
    checkpoint: Optional[str]
    moe_layers: List[int]
    dense_layers: List[int]
    num_experts: int
    top_k: int
    granularity: int
    router_init: str
    w2_scale: float
    tensors_copied: int
    tensors_upcycled: int
    optimizer: str  # "fresh" or "carried"
    exact_expected: bool
    notes: List[str] = field(default_factory=list)
    drop_ratio: float = 0.0
    verified: bool = False
    max_abs_diff: Optional[float] = None
    max_abs_logit: Optional[float] = None
    tolerance: Optional[float] = None
    bf16_max_abs_diff: Optional[float] = None
    """bf16 MoE config: the saved bf16 MoE model against the dense one cast to bf16."""
    bf16_tolerance: Optional[float] = None
    ranks: int = 1
    peak_rss_mib: Optional[List[float]] = None
    """Each rank's peak resident memory (MiB) over the whole upcycle."""
    start_rss_mib: Optional[List[float]] = None
    """Each rank's peak resident memory when the runtime had started, before any model."""
    shard_mib: Optional[List[float]] = None
    """Each rank's parameters x (weights + fp32 grads + fresh Adam state) bytes (MiB)."""
    source_tensors_read: Optional[List[float]] = None
    """Hugging Face sources: how many of the folder's tensors each rank read."""

    @property
    def preserved(self) -> Optional[bool]:
        """Logits within the fp32 tolerance (None when not verified)."""
        if not self.verified:
            return None
        bf16_ok = self.bf16_max_abs_diff is None or self.bf16_max_abs_diff <= self.bf16_tolerance
        return self.max_abs_diff <= self.tolerance and bf16_ok

    @property
    def ok(self) -> bool:
        return not self.verified or bool(self.preserved) or not self.exact_expected

    def to_dict(self) -> Dict:
        return dict(asdict(self), preserved=self.preserved, ok=self.ok)

    def summary(self) -> str:
        lines = [f"upcycled {self.source} ({self.source_kind}): MoE layers {self.moe_layers}, "
                 f"{self.num_experts} experts top-{self.top_k}, granularity {self.granularity}, "
                 f"router {self.router_init}, expert w2 x {self.w2_scale:g}, "
                 f"drop ratio {self.drop_ratio:g}, optimizer "
                 f"{self.optimizer}; {self.tensors_copied} tensors copied, "
                 f"{self.tensors_upcycled} built"]
        if self.verified:
            verdict = ("preserved" if self.preserved else
                       "NOT preserved" if self.exact_expected else "approximate, as expected")
            lines.append(f"function check: max |logits MoE - dense| = {self.max_abs_diff:.3g} "
                         f"(tolerance {self.tolerance:.3g}, max |logit| {self.max_abs_logit:.3g}): "
                         f"{verdict}")
            if self.bf16_max_abs_diff is not None:
                lines.append(f"bf16 check: max |logits MoE - dense| = {self.bf16_max_abs_diff:.3g} "
                             f"(tolerance {self.bf16_tolerance:.3g}: {BF16_RTOL:g} x max |logit|, "
                             "both models in bf16)")
        else:
            lines.append("function check: skipped")
        if self.peak_rss_mib:
            lines.append(f"{self.ranks} rank(s); peak resident memory per rank (MiB): "
                         f"{', '.join(f'{m:.0f}' for m in self.peak_rss_mib)} (at the start "
                         f"{', '.join(f'{m:.0f}' for m in self.start_rss_mib)}; each rank's "
                         "weights + grads + Adam state: "
                         f"{', '.join(f'{m:.0f}' for m in self.shard_mib)})")
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"checkpoint: {self.checkpoint}" if self.checkpoint else
                     "no checkpoint written (the function check failed; --no-verify skips it)")
        return "\n".join(lines)


def _check_out_dir(out_dir: str) -> None:
    if complete_checkpoints(os.path.join(out_dir, "checkpoints")):
        raise UpcycleError(f"{out_dir} already holds checkpoints: training there would resume "
                           "from the newest one; choose an empty --out folder")


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def upcycle(dense_source: str, moe_config: Config, out_dir: str, router_init: str = "zero",
            router_std: float = 0.02, granularity: int = 1, scale_weights: bool = True,
            verify: bool = True, carry_optimizer: bool = False, drop_ratio: float = 0.0,
            log: Optional[Callable[[str], None]] = None) -> UpcycleReport:
    """Upcycle ``dense_source`` into ``moe_config``'s MoE decoder and save it under ``out_dir``.

    Args:
        dense_source: our checkpoint (step folder, checkpoints root or run folder; any layout)
            or a Hugging Face Llama folder.
        moe_config: the MoE model to build; its decoder must have the dense model's shapes.
        router_init: "zero" (uniform probabilities; exact preservation for every routing order)
            or "random" (N(0, router_std) per copy; exact with normalized top-k).
        granularity: G shards per dense FFN (expert_ffn_hidden_size = F / G, num_experts and
            top_k multiples of G).
        scale_weights: multiply expert w2 so the MoE output matches the dense one
            (G with normalized top-k, E G / K with un-normalized softmax_topk).
        verify: compare logits on a sample batch; a failure writes no checkpoint.
        carry_optimizer: start Adam from the dense checkpoint's moments (see ``carry.py``).
        drop_ratio: Drop-Upcycling, the fraction of each expert's intermediate units
            re-initialised (0: plain copies; see ``convert.py``).
    Starts and tears down its own runtime, as ``training.loop.train`` does: one process, or
    under torchrun every rank of the MoE config's layout, each converting its own part
    (``distributed.py``).
    """
    say = log or (lambda _msg: None)
    source, plan, dense_cfg, hf_tensors = _prepare(dense_source, moe_config, out_dir, granularity,
                                                   router_init, router_std, scale_weights,
                                                   carry_optimizer, drop_ratio)
    if _world_size() > 1:
        return _upcycle_on_ranks(source, plan, dense_cfg, hf_tensors, moe_config, out_dir,
                                 verify, say)
    from .distributed import peak_rss_mib, shard_mib

    work = single_process_config(moe_config, "fp32")
    runtime = initialize(work)
    start = peak_rss_mib()
    try:
        say(f"loading the dense model from {source.path}")
        dense_chunks, moments = _read_dense(source, dense_cfg, runtime, carry_optimizer,
                                            hf_tensors)
        del hf_tensors  # the dense chunks hold the weights now
        dense_state = global_state_dict(dense_chunks)
        moe_state = upcycle_state_dict(dense_state, plan)
        moe_chunks = build_model_chunks(work, on_cpu=runtime.cpu_compat)
        _fill_(moe_chunks, moe_state)
        upcycled = len(set(moe_state) - set(dense_state))
        report = _new_report(source, out_dir, plan, moe_config,
                             len(set(dense_state) & set(moe_state)), upcycled, carry_optimizer)
        if verify:
            say("comparing the MoE model's logits with the dense model's")
            check = compare(dense_chunks, moe_chunks, work, runtime.device)
            report.verified = True
            report.max_abs_diff, report.max_abs_logit = check.max_abs_diff, check.max_abs_logit
            report.tolerance = check.tolerance
        saved_chunks = moe_chunks
        if moe_config.train.dtype != "fp32":  # the checkpoint's own dtype: build and fill it
            saved_chunks = _filled(moe_config, moe_state, runtime)
            if verify:
                say(f"comparing again with both models in {moe_config.train.dtype}")
                low = compare(_filled(dense_cfg, dense_state, runtime, moe_config.train.dtype),
                              saved_chunks,
                              single_process_config(moe_config, moe_config.train.dtype),
                              runtime.device, rtol=BF16_RTOL, atol=0.0)
                report.bf16_max_abs_diff, report.bf16_tolerance = low.max_abs_diff, low.tolerance
        del dense_chunks
        if report.ok:
            set_carried = carried_state_fn(moments, plan) if moments else None
            report.checkpoint = _save(moe_config, saved_chunks, out_dir, set_carried)
        report.start_rss_mib, report.peak_rss_mib = [round(start, 1)], [round(peak_rss_mib(), 1)]
        report.shard_mib = [round(shard_mib(saved_chunks, moe_config.train.dtype), 1)]
        _write_report(report, out_dir)
        return report
    finally:
        shutdown()


def _upcycle_on_ranks(source: DenseSource, plan: UpcyclePlan, dense_cfg: Config, hf_tensors,
                      moe_config: Config, out_dir: str, verify: bool, say) -> UpcycleReport:
    """Every rank converts its own part of the MoE config's layout (``distributed.py``)."""
    import torch.distributed as dist

    from .distributed import (build_parts, cast_parameters_, compare_distributed,
                              fill_moe_from_dense_, global_names, layout_config, peak_rss_mib,
                              per_rank, shard_mib)

    work = layout_config(moe_config, moe_config.train.dtype)
    runtime = initialize(work)
    start = peak_rss_mib()
    main = dist.get_rank() == 0
    tell = say if main else (lambda _msg: None)
    try:
        tell(f"loading this rank's part of the dense model from {source.path} "
             f"({dist.get_world_size()} ranks)")
        dense_chunks, moe_chunks = build_parts(moe_config, dense_cfg, source, hf_tensors, runtime)
        read = getattr(hf_tensors, "read", None)
        del hf_tensors
        fill_moe_from_dense_(moe_chunks, dense_chunks, plan)
        upcycled = 3 * len(plan.moe_layers)
        report = _new_report(source, out_dir, plan, moe_config,
                             len(global_names(moe_chunks)) - upcycled, upcycled, False)
        report.ranks = dist.get_world_size()
        if read is not None:
            report.source_tensors_read = per_rank(len(read))
        report.shard_mib = per_rank(shard_mib(moe_chunks, work.train.dtype))
        report.start_rss_mib = per_rank(start)
        if verify:
            tell("comparing the MoE model's logits with the dense model's on the last stage")
            rtol, atol = (BF16_RTOL, 0.0) if work.train.dtype != "fp32" else (None, ATOL)
            if work.train.dtype != "fp32":
                cast_parameters_(dense_chunks, moe_chunks[0].config.params_dtype)
                report.notes.append(f"checked with both models in {work.train.dtype} only (the "
                                    "one-process path checks in fp32 first)")
            check = compare_distributed(dense_chunks, moe_chunks, work, runtime.device,
                                        rtol, atol)
            report.verified = True
            report.max_abs_diff, report.max_abs_logit = check.max_abs_diff, check.max_abs_logit
            report.tolerance = check.tolerance
        del dense_chunks
        if report.ok:
            recorded = copy.deepcopy(moe_config)
            recorded.train.output_dir, recorded.train.load_from = out_dir, None
            if main:
                os.makedirs(out_dir, exist_ok=True)
                dump_config(recorded, os.path.join(out_dir, "config.yaml"))
            report.checkpoint = write_checkpoint(out_dir, work, moe_chunks, recorded,
                                                 lambda _chunks, opt: fresh_optimizer_state_(opt))
        report.peak_rss_mib = per_rank(peak_rss_mib())
        if main:
            _write_report(report, out_dir)
        return report
    finally:
        shutdown()


def _filled(config: Config, state: Dict[str, torch.Tensor], runtime,
            dtype: Optional[str] = None) -> List[torch.nn.Module]:
    """Single-process chunks of ``config`` in ``dtype`` (default its own), every tensor from
    ``state``."""
    chunks = build_model_chunks(single_process_config(config, dtype or config.train.dtype),
                                on_cpu=runtime.cpu_compat)
    _fill_(chunks, state)
    return chunks


def _prepare(dense_source: str, moe_config: Config, out_dir: str, granularity: int,
             router_init: str, router_std: float, scale_weights: bool, carry_optimizer: bool,
             drop_ratio: float = 0.0):
    """Every check that needs no model: (source, plan, dense config, and a Hugging Face folder's
    tensors, else None). Raises UpcycleError or InteropError."""
    if carry_optimizer and _world_size() > 1:
        raise UpcycleError(f"carry_optimizer runs in one process (WORLD_SIZE is {_world_size()}):"
                           " run it without torchrun; the checkpoint loads into any layout")
    source = resolve_source(dense_source)
    if carry_optimizer and source.kind != "mm1-moe":
        raise UpcycleError(f"carry_optimizer needs an mm1-moe checkpoint with optimizer state; "
                           f"{source.path} is a {source.kind} folder")
    validate(moe_config)
    plan = make_plan(moe_config, granularity, router_init, router_std, scale_weights, drop_ratio)
    if carry_optimizer and plan.dropped_units:
        raise UpcycleError(f"carry_optimizer with drop_ratio {drop_ratio:g}: the dense Adam "
                           "moments describe the weights Drop-Upcycling replaces; start the "
                           "optimizer fresh (drop --carry-optimizer) or use drop ratio 0")
    _check_out_dir(out_dir)
    dense_cfg = dense_config(source, moe_config)
    if carry_optimizer and dense_cfg.train.dtype != moe_config.train.dtype:
        raise UpcycleError(f"carry_optimizer: the dense run trained with train.dtype="
                           f"{dense_cfg.train.dtype} and the MoE config has "
                           f"{moe_config.train.dtype}; Adam's state does not convert between "
                           f"them: set train.dtype={dense_cfg.train.dtype}, or start fresh")
    check_same_decoder(dense_cfg.model.decoder, moe_config.model.decoder, source.path)
    # A Hugging Face folder is read and checked tensor by tensor now, before the runtime starts
    # and both models are built: a missing or mis-shaped tensor fails before that work
    hf_tensors = read_hf_llama(source.path, dense_cfg) if source.kind == "huggingface" else None
    return source, plan, dense_cfg, hf_tensors


def _read_dense(source: DenseSource, dense_cfg: Config, runtime, carry_optimizer: bool,
                hf_tensors: Optional[Dict[str, torch.Tensor]]):
    """Single-process fp32 dense chunks loaded from the source (a Hugging Face folder: from the
    tensors ``_prepare`` read), and (carry_optimizer) the dense run's Adam moments."""
    work = single_process_config(dense_cfg, "fp32")
    chunks = build_model_chunks(work, on_cpu=runtime.cpu_compat)
    if carry_optimizer:  # the optimizer loads only into the dtype it was saved from
        own = single_process_config(dense_cfg, dense_cfg.train.dtype)
        own_chunks = chunks if own.train.dtype == "fp32" else build_model_chunks(
            own, on_cpu=runtime.cpu_compat)
        moments = read_dense_optimizer(own, own_chunks, source.path)
        if own_chunks is not chunks:  # fp32 copies of the bf16 weights, for the fp32 check
            _fill_(chunks, global_state_dict(own_chunks))
        return chunks, moments
    load_source_(chunks, source, work, hf_tensors)
    return chunks, None


def _new_report(source: DenseSource, out_dir: str, plan: UpcyclePlan, moe_config: Config,
                copied: int, upcycled: int, carry_optimizer: bool) -> UpcycleReport:
    exact, notes = expected_exact(plan, moe_config)
    layers = range(moe_config.model.decoder.num_layers)
    return UpcycleReport(
        source.path, source.kind, out_dir, None, list(plan.moe_layers),
        [i for i in layers if i not in plan.moe_layers], plan.num_experts, plan.top_k,
        plan.granularity, plan.router_init, plan.w2_scale,
        tensors_copied=copied, tensors_upcycled=upcycled,
        optimizer="carried" if carry_optimizer else "fresh", exact_expected=exact, notes=notes,
        drop_ratio=plan.drop_ratio)


def _fill_(chunks: List[torch.nn.Module], state: Dict[str, torch.Tensor]) -> None:
    """Every parameter from ``state``; every tensor of ``state`` used (nothing silently left at
    its random init, nothing silently dropped)."""
    used = set()

    def lookup(name: str, shape) -> torch.Tensor:
        if name not in state:
            raise UpcycleError(f"MoE model tensor {name} has no source in the upcycled state")
        used.add(name)
        return state[name]

    try:
        fill_from_global_(chunks, lookup)
    except ValueError as err:  # a shape that differs (fill_from_global_ names the tensor)
        raise UpcycleError(str(err)) from err
    unused = sorted(set(state) - used)
    if unused:
        raise UpcycleError(f"dense tensors with no place in the MoE model: {unused[:8]}")


def _save(moe_config: Config, chunks, out_dir: str, set_carried) -> str:
    """Step-0 checkpoint in the MoE config's dtype (the optimizer's format depends on it);
    ``chunks`` are in that dtype."""
    save_cfg = single_process_config(moe_config, moe_config.train.dtype)
    recorded = copy.deepcopy(moe_config)
    recorded.train.output_dir, recorded.train.load_from = out_dir, None
    os.makedirs(out_dir, exist_ok=True)
    dump_config(recorded, os.path.join(out_dir, "config.yaml"))

    def set_state(ddp_chunks, optimizer) -> None:
        if set_carried is None:
            fresh_optimizer_state_(optimizer)
        else:
            set_carried(ddp_chunks, optimizer)

    return write_checkpoint(out_dir, save_cfg, chunks, recorded, set_state)


def _write_report(report: UpcycleReport, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, REPORT), "w", encoding="utf-8") as handle:
        json.dump(report.to_dict(), handle, indent=1)
