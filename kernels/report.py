"""A static report of every kernel launch a model makes, compiled for a GPU target without a GPU:
registers, spills, shared memory, warps and stages, how each tl.dot lowered (wgmma, mma.sync or
FMA), TMA use, and the CTAs and warps that fit on one SM.

Shape legend (as the kernel files): T tokens, D model width, F expert FFN width, E experts,
e local experts, K top-k, N = T*K routed rows; B batch, S sequence, H heads, Dh head dim.

How a launch is captured: the layers run on ``meta`` tensors (shapes, no data, no GPU) through
their real autograd Functions, forward and backward, in a child process with the interpreter
off (so the launchers pick their GPU tiles and ``UPCAST=False``, as on a card). While they run,
``JITFunction.run`` is replaced by a recorder that binds the arguments with Triton's own binder
for the target, exactly as a real ``kernel[grid](...)`` call does: pointer and integer arguments
get their 16-divisibility hints from the real values, integers equal to 1 become constexprs.
Nothing is launched. The distinct specializations are then compiled by ``compile_check`` (its
child processes: private cache, interpreter off), two at a time, and ``ptxas -v`` (the one
Triton ships) is run on each PTX for registers and spills.

The shapes come in as a plain dict (``mm1_moe/kernel_shapes.py`` builds it from a config):
  {"name": str, "dtype": "bf16",
   "moe": {"tokens", "hidden", "ffn", "experts", "top_k", "expert_parallel", "router_order",
           "normalize_topk", "token_mask", "recompute_fc1"},
   "norm": {"tokens", "hidden"},
   "attention": [{"name", "batch", "seq", "heads", "kv_heads", "head_dim", "causal",
                  "documents"}, ...]}
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from ._common import SHARED_MEMORY_LIMIT

TARGETS = {"sm90": 90, "sm80": 80}
REGISTERS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
# The driver keeps 1 KiB of shared memory per CTA; an SM holds the per-block limit plus that.
SMEM_RESERVED_PER_CTA = 1024
# SMs of the cards the tiles are sized for (H100 SXM, A100): the RMSNorm backward sizes its grid
# by them.
NUM_SMS = {90: 132, 80: 108}


@dataclasses.dataclass(frozen=True)
class Launch:
    """One captured ``kernel[grid](...)`` call, as Triton's binder specialized it."""

    stage: str
    module: str
    kernel: str
    grid: Tuple[int, ...]
    signature: Dict[str, str]
    """Every argument's Triton type; ``"constexpr"`` for those in ``constexprs``."""
    constexprs: Dict[str, object]
    divisible: Tuple[str, ...]
    """Arguments the launch marks 16-divisible."""
    num_warps: int
    num_stages: int
    tensors: Dict[str, str]
    """Tensor arguments as ``"bf16[4096, 4096]"``."""

    def key(self) -> str:
        """Identity of the compiled specialization (launches sharing it compile once)."""
        return json.dumps([self.module, self.kernel, self.signature,
                           {k: str(v) for k, v in self.constexprs.items()}, self.divisible,
                           self.num_warps, self.num_stages], sort_keys=True)


@dataclasses.dataclass(frozen=True)
class Row:
    """A launch and what its compile gave: ``stats`` from ``compiled_details`` plus occupancy,
    or ``error`` (the compile error's text)."""

    launch: Launch
    stats: Optional[Dict[str, object]]
    error: Optional[str] = None


# ----------------------------------------------------------------------------- analysis


def occupancy(registers: int, shared: int, num_warps: int, capability: int) -> Dict[str, object]:
    """CTAs per SM (and what limits them): registers are allocated per warp in units of 256
    (8 per thread), 64K per SM; shared memory per CTA plus the 1 KiB reserve; 64 warps and 32
    CTAs per SM at most (sm80 and sm90 alike)."""
    regs_per_warp = -(-max(registers, 1) // 8) * 8 * 32
    smem_per_sm = SHARED_MEMORY_LIMIT[capability] + SMEM_RESERVED_PER_CTA
    limits = {"registers": REGISTERS_PER_SM // (regs_per_warp * num_warps),
              "shared": smem_per_sm // (shared + SMEM_RESERVED_PER_CTA),
              "warps": MAX_WARPS_PER_SM // num_warps, "ctas": MAX_CTAS_PER_SM}
    limiter = min(limits, key=limits.get)
    ctas = limits[limiter]
    return {"ctas_per_sm": ctas, "warps_per_sm": ctas * num_warps, "limited_by": limiter}


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                          r"(\d+) bytes spill loads")


def ptxas_info(ptx: str, capability: int) -> Dict[str, int]:
    """Registers per thread, stack frame and spill bytes per thread, from ``ptxas -v`` (the
    ptxas Triton ships and compiles with) on ``ptx``."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w", encoding="utf-8") as handle:
            handle.write(ptx)
        done = subprocess.run([get_ptxas(capability).path, "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={sm_arch_from_capability(capability)}", src,
                               "-o", os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True, check=True)
    log = done.stdout + done.stderr
    used = _PTXAS_USED.findall(log)
    spills = [tuple(map(int, m)) for m in _PTXAS_SPILL.findall(log)]
    if not used:
        raise RuntimeError(f"no register count in the ptxas log:\n{log}")
    return {"registers": max(map(int, used)),
            "stack_frame": sum(s[0] for s in spills), "spill_stores": sum(s[1] for s in spills),
            "spill_loads": sum(s[2] for s in spills)}


def mma_kind(ttir: str, ttgir: str, ptx: str) -> Dict[str, object]:
    """How the kernel's tl.dots lowered: ``dots`` in the Triton IR; ``wgmma`` of them became
    Hopper warp-group MMAs (``ttng.warp_group_dot``); the others stayed ``tt.dot`` and became
    ``mma.sync`` (Ampere MMA) or FMA loops."""
    dots = len(re.findall(r"\btt\.dot\b", ttir))
    wgmma = len(re.findall(r"\bttng\.warp_group_dot\b(?!_)", ttgir))
    other = len(re.findall(r"\btt\.dot\b", ttgir))
    kinds = ([f"wgmma x{wgmma}"] if wgmma else []) + (
        [f"{'mma' if 'mma.sync' in ptx else 'fma'} x{other}"] if other else [])
    return {"dots": dots, "wgmma_dots": wgmma, "other_dots": other,
            "mma": "+".join(kinds) if kinds else "-"}


def compiled_details(compiled, capability: int, num_warps: int) -> Dict[str, object]:
    """What the report shows of one compiled kernel (called by ``compile_check`` in its child)."""
    asm = compiled.asm
    ptx = asm["ptx"]
    shared = int(compiled.metadata.shared)
    info = ptxas_info(ptx, capability)
    return {**info, "shared": shared, **mma_kind(asm["ttir"], asm["ttgir"], ptx),
            "tma": "cp.async.bulk.tensor" in ptx,
            **occupancy(info["registers"], shared, num_warps, capability)}


# ----------------------------------------------------------------------------- capture

_STAGE = ["-"]  # the label launches are recorded under (``stage``)
_TORCH_TO_TRITON = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64",
                    "int32": "i32", "int64": "i64", "int8": "i8", "uint8": "u8", "bool": "i1"}


def _describe(value) -> Optional[str]:
    if hasattr(value, "dtype") and hasattr(value, "shape") and hasattr(value, "data_ptr"):
        dtype = _TORCH_TO_TRITON.get(str(value.dtype).replace("torch.", ""), str(value.dtype))
        return f"{dtype}{list(value.shape)}"
    return None


def _plain(value) -> object:
    """A constexpr as JSON: Triton dtypes become {"tl.dtype": name} (compile_check's encoding)."""
    import triton.language as tl

    return {"tl.dtype": str(value)} if isinstance(value, tl.dtype) else value


@contextlib.contextmanager
def capture_launches(capability: int) -> Iterator[List[Launch]]:
    """Within the block, every ``@triton.jit`` kernel launch is recorded (bound for
    ``sm_<capability>`` by Triton's own binder) instead of run. Also gives ``bincount`` a meta
    kernel (output of ``minlength`` entries: the launchers only count values below it), the one
    op of the layers' backward that meta tensors lack."""
    import torch
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import jit

    backend = make_backend(GPUTarget("cuda", capability, 32))
    launches: List[Launch] = []

    def record(self, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", self.debug) or knobs.runtime.debug
        for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):  # 3.9; 3.6: the first
            if hasattr(knobs.compilation, knob):
                kwargs[knob] = getattr(knobs.compilation, knob)
        binder = jit.create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound,
                                                                specialization, options)
        names = self.arg_names
        grid = grid(bound) if callable(grid) else grid
        launches.append(Launch(
            _STAGE[-1], self.fn.__module__, self.fn.__name__, tuple(int(g) for g in grid),
            dict(signature), {names[path[0]]: _plain(v) for path, v in constexprs.items()},
            tuple(names[path[0]] for path, hints in attrs.items()
                  if ["tt.divisibility", 16] in [list(h) for h in hints]),
            options.num_warps, options.num_stages,
            {n: d for n, v in bound.items() if (d := _describe(v)) is not None}))

    library = torch.library.Library("aten", "IMPL")
    library.impl("bincount", lambda values, weights=None, minlength=0: torch.empty(
        minlength, dtype=torch.int64, device="meta"), "Meta")
    saved = jit.JITFunction.run
    jit.JITFunction.run = record
    try:
        yield launches
    finally:
        jit.JITFunction.run = saved
        library._destroy()


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    _STAGE.append(name)
    try:
        yield
    finally:
        _STAGE.pop()


def _backward(*outputs) -> None:
    import torch

    torch.autograd.backward([o.float().sum() for o in outputs])


def _moe(moe: Mapping[str, object], dtype, ep: int) -> None:
    """The MoE layer's kernels, as ``mm1_moe/moe/layer.py`` runs them: with ep = 1 the fused
    ``GatherDispatcher`` path (experts read x_TD through the sort, rows scaled by the routing
    weight, unweighted combine); with ep > 1 the ``AllToAllDispatcher`` path (dispatch copy, the
    exchange (a no-op here: shapes only, N rows assumed received), the local regroup by the e
    local experts, unscaled experts, two combines)."""
    import torch

    from .combine import combine
    from .dispatch import dispatch, dispatch_metadata
    from .experts import swiglu_experts
    from .router import router

    T, D, F = int(moe["tokens"]), int(moe["hidden"]), int(moe["ffn"])
    E, K = int(moe["experts"]), int(moe["top_k"])
    e = E // ep
    meta_dev = dict(device="meta")
    x_TD = torch.empty(T, D, dtype=dtype, requires_grad=True, **meta_dev)
    logits_TE = torch.empty(T, E, dtype=torch.float32, requires_grad=True, **meta_dev)
    mask_T = torch.empty(T, dtype=torch.bool, **meta_dev) if moe.get("token_mask") else None
    w1 = torch.empty(e, D, 2 * F, dtype=dtype, requires_grad=True, **meta_dev)
    w2 = torch.empty(e, F, D, dtype=dtype, requires_grad=True, **meta_dev)
    recompute = bool(moe.get("recompute_fc1", False))
    with stage(f"moe ep={ep} fwd"):
        route = router(logits_TE, K, str(moe.get("router_order", "softmax_topk")),
                       bool(moe.get("normalize_topk", False)), mask_T)
        meta = dispatch_metadata(route.ids_TK, E)
        if ep == 1:
            gather_N = torch.div(meta.sort_index_N, K, rounding_mode="floor")
            scale_N = route.weights_TK.reshape(-1)[meta.sort_index_N.long()]
            y_ND = swiglu_experts(x_TD, w1, w2, meta.offsets_E1, gather_N, scale_N,
                                  recompute_fc1=recompute)
            out_TD = combine(y_ND, None, meta)
        else:
            x_ND = dispatch(x_TD, meta)
            local_ids = torch.empty(T * K, 1, dtype=torch.int32, **meta_dev)
            local_meta = dispatch_metadata(local_ids, e)
            y_local = swiglu_experts(dispatch(x_ND, local_meta), w1, w2, local_meta.offsets_E1,
                                     recompute_fc1=recompute)
            out_TD = combine(combine(y_local, None, local_meta), route.weights_TK, meta)
    with stage(f"moe ep={ep} bwd"):
        _backward(out_TD, route.aux_loss, route.z_loss)


def _norm(norm: Mapping[str, object], dtype, capability: int) -> None:
    import torch

    from .rmsnorm import gpu_tiles, rms_norm

    T, D = int(norm["tokens"]), int(norm["hidden"])
    x = torch.empty(T, D, dtype=dtype, device="meta", requires_grad=True)
    w = torch.empty(D, dtype=dtype, device="meta", requires_grad=True)
    with stage("rmsnorm fwd"):
        y = rms_norm(x, w, 1e-5, gpu_tiles(T, D, NUM_SMS[capability]))
    with stage("rmsnorm bwd"):
        _backward(y)


def _attention(att: Mapping[str, object], dtype, capability: int) -> None:
    """q, k, v as Megatron hands them over: [S, B, H, Dh] tensors viewed as [B, S, H, Dh]."""
    import torch

    from .attention import flash_attention, gpu_blocks

    B, S, Dh = int(att["batch"]), int(att["seq"]), int(att["head_dim"])
    H, Hkv = int(att["heads"]), int(att.get("kv_heads", att["heads"]))
    q, k, v = (torch.empty(S, B, h, Dh, dtype=dtype, device="meta").transpose(0, 1)
               .requires_grad_() for h in (H, Hkv, Hkv))
    docs = torch.empty(B, S, dtype=torch.int32, device="meta") if att.get("documents") else None
    name = f"{att['name']} Dh={Dh}" if att.get("name") else f"Dh={Dh}"
    with stage(f"attention {name} fwd"):
        o = flash_attention(q, k, v, bool(att["causal"]), doc_ids_BS=docs,
                            blocks=gpu_blocks(Dh, capability))
    with stage(f"attention {name} bwd"):
        _backward(o)


def capture(shapes: Mapping[str, object], capability: int) -> List[Launch]:
    """Every launch of the MoE layer, the RMSNorm and each attention in ``shapes``, forward and
    backward. Needs the interpreter off (``TRITON_INTERPRET=0`` before kernels/ is imported):
    ``kernel_report`` runs it in a child process."""
    import torch

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = dtypes[str(shapes.get("dtype", "bf16"))]
    with capture_launches(capability) as launches:
        if shapes.get("moe"):
            moe = shapes["moe"]
            _moe(moe, dtype, 1)
            if int(moe.get("expert_parallel", 1)) > 1:
                _moe(moe, dtype, int(moe["expert_parallel"]))
        if shapes.get("norm"):
            _norm(shapes["norm"], dtype, capability)
        for att in shapes.get("attention", []):
            _attention(att, dtype, capability)
    return launches


# ----------------------------------------------------------------------------- the report


def _child_env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_INTERPRET"] = "0"  # explicit: kernels/__init__.py turns it on when CPU-only
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's FutureWarning
    return env


def capture_in_child(shape_sets: Sequence[Mapping[str, object]], capability: int,
                     candidates: bool = False) -> List[List[Launch]]:
    """``capture`` of each shape set (with ``candidates``: every tile candidate of every op,
    ``tile_candidates.capture_candidates``), run in a child process with the interpreter off."""
    with tempfile.TemporaryDirectory() as tmp:
        payload = os.path.join(tmp, "shapes.json")
        with open(payload, "w", encoding="utf-8") as handle:
            json.dump({"capability": capability, "shapes": list(shape_sets),
                       "candidates": candidates}, handle)
        done = subprocess.run([sys.executable, "-m", __name__, payload], env=_child_env(),
                              text=True, capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"kernel capture failed:\n{done.stderr[-4000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return [[Launch(**dict(r, grid=tuple(r["grid"]), divisible=tuple(r["divisible"])))
             for r in launches] for launches in out]


_COMPILED: Dict[Tuple[str, int], object] = {}  # launch key, capability -> details or error text


def compile_launches(launches: Sequence[Launch], capability: int,
                     workers: int = 2) -> List[Row]:
    """Compile each distinct specialization once (cached for the process), ``workers`` child
    processes at a time, and pair every launch with its result."""
    from .compile_check import CompileJob, CompileRequest

    todo: Dict[str, Launch] = {}
    for launch in launches:
        if (launch.key(), capability) not in _COMPILED:
            todo.setdefault(launch.key(), launch)
    pending = list(todo.values())
    # Attention kernels compile longest: deal them round-robin so the workers finish together.
    pending.sort(key=lambda la: (not la.kernel.startswith("_attn"), la.kernel))
    batches = [pending[i::workers] for i in range(workers)]
    jobs = [(batch, CompileJob([CompileRequest(
        la.module, la.kernel, la.signature, la.constexprs, capability, la.num_warps,
        la.num_stages, divisible=list(la.divisible), details=True) for la in batch]))
        for batch in batches if batch]
    for batch, job in jobs:
        for launch, result in zip(batch, job.results()):
            _COMPILED[(launch.key(), capability)] = result
    rows = []
    for launch in launches:
        result = _COMPILED[(launch.key(), capability)]
        rows.append(Row(launch, None, result) if isinstance(result, str)
                    else Row(launch, dict(result)))
    return rows


def kernel_report(shape_sets: Sequence[Mapping[str, object]], target: str = "sm90",
                  workers: int = 2, candidates: bool = False) -> List[List[Row]]:
    """For each shape set (see the module docstring), a row per kernel launch of its MoE layer,
    RMSNorm and attentions, compiled for ``target`` ("sm90" or "sm80"). With ``candidates``,
    instead a row per launch of every GPU tile candidate of every op
    (``kernels/tile_candidates.py``), at the shape set's shapes, each under the stage
    ``tiles <op> <table key> | <tile>``."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    capability = TARGETS[target]
    captured = capture_in_child(shape_sets, capability, candidates)
    rows = compile_launches([la for launches in captured for la in launches], capability,
                            workers)
    out, start = [], 0
    for launches in captured:
        out.append(rows[start:start + len(launches)])
        start += len(launches)
    return out


_COLUMNS = ("stage", "kernel", "grid", "warps", "stages", "regs", "spill st/ld B", "smem KiB", "mma",
            "tma", "CTAs/SM", "warps/SM")


def _cells(row: Row) -> Tuple[str, ...]:
    la, s = row.launch, row.stats
    head = (la.stage, la.kernel.strip("_").removesuffix("_kernel"), "x".join(map(str, la.grid)),
            str(la.num_warps), str(la.num_stages))
    if s is None:
        return head + ("compile error: " + (row.error or "").splitlines()[0][:60],) + ("",) * 6
    return head + (str(s["registers"]), f"{s['spill_stores']}/{s['spill_loads']}",
                   f"{s['shared'] / 1024:.1f}", str(s["mma"]), "yes" if s["tma"] else "no",
                   f"{s['ctas_per_sm']} ({s['limited_by'][:4]})", str(s["warps_per_sm"]))


def format_table(rows: Sequence[Row]) -> str:
    """One line per launch; spill st/ld = bytes of spill stores / loads per thread (ptxas -v);
    smem = shared memory per CTA; CTAs/SM names its limit
    (regi[sters], shar[ed], warp[s], ctas)."""
    table = [_COLUMNS] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in table)


def report_json(rows: Sequence[Row]) -> List[Dict[str, object]]:
    return [dict(dataclasses.asdict(r.launch), **(r.stats or {}), error=r.error) for r in rows]


if __name__ == "__main__":  # the capture child: a JSON payload; one JSON list on the last line
    with open(sys.argv[1], encoding="utf-8") as handle:
        request = json.load(handle)
    if request.get("candidates"):
        from .tile_candidates import capture_candidates as _capture
    else:
        _capture = capture
    print(json.dumps([[dataclasses.asdict(la) for la in _capture(shapes, request["capability"])]
                      for shapes in request["shapes"]]))
