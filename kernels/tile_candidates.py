"""Every op's GPU tile candidates, and how to launch each op at a shape with a given tile: the one
list that the static report compiles (``kernel_report(..., candidates=True)``, or
``mm1-moe kernels report --candidates``; held to no spills, shared memory within the limit and
wgmma by tests/kernels/test_kernel_report.py) and that ``benchmarks/bench_tile_sweep.py`` times
on a card.

Shape legend (as the kernel files): T tokens, D model width, F expert FFN width, E experts (local
ones for an expert-parallel rank), K top-k, N = T*K routed rows; B batch, S sequence, H query
heads, Hkv key/value heads, Dh head dim.

The candidates themselves live next to each op's table, in the op's own file
(``DISPATCH_BWD_CANDIDATES``, ``GPU_DW_CANDIDATES``, ``FC1_GPU_CANDIDATES``,
``attention.gpu_candidates`` ...); this file only names them and knows how to launch each op
through its launcher's block override. ``candidates(dims)`` puts the table's own pick at those
dims first: the sweep's baseline.

Why tables and not ``@triton.autotune``: BLOCK_M is fixed before the launch by the tile schedule
fc1, fc2 and dA share, attention's document ranges are computed per BLOCK_M on the host, BLOCK_K
sets the dW summation order (a per-process pick would make ranks and runs differ in their bits),
and the interpreter wants its own tiles. One offline sweep on a card pins the tables instead.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import torch

Dims = Mapping[str, object]


@dataclasses.dataclass(frozen=True)
class TileOp:
    """One op whose tile is a table entry: what it launches, its candidates, and a runner."""

    name: str
    kernels: Tuple[str, ...]
    """The kernels whose tiles the candidates set (other launches of ``run`` are not its own)."""
    table: Callable[[Dims], object]
    """The table's GPU tile at these dims."""
    options: Callable[[Dims], Sequence[object]]
    """Every candidate (the table's pick may or may not be among them)."""
    key: Callable[[Dims], str]
    """What the table is keyed by, as text (``D=4096``, ``rows_per_expert=256``)."""
    label: Callable[[object], str]
    build: Callable[[Dims, torch.device, torch.dtype], Dict[str, object]]
    run: Callable[[Dict[str, object], object], object]
    """Launch the op once with this tile; returns its output tensor(s)."""

    def candidates(self, dims: Dims) -> List[object]:
        """The table's pick first, then the other candidates, without repeats."""
        out = [self.table(dims)]
        out += [c for c in self.options(dims) if c not in out]
        return out


# ----------------------------------------------------------------------------- labels


def _rows_cols(tile) -> str:
    return f"{tile[0]}x{tile[1]}"


def _gemm(b) -> str:
    return f"{b.block_m}x{b.block_n}x{b.block_k} w{b.num_warps} s{b.num_stages}"


def _attn_fwd(b) -> str:
    return f"{b.fwd_m}x{b.fwd_n} w{b.fwd_warps} s{b.fwd_stages}"


def _attn_bwd(b) -> str:
    return f"dkdv {b.dkdv_m}x{b.dkdv_n} dq {b.dq_m}x{b.dq_n} w{b.bwd_warps} s{b.bwd_stages}"


# ----------------------------------------------------------------------------- inputs


def _balanced_meta(T: int, K: int, E: int, device):
    """Routing metadata with every expert getting T*K/E rows: slot s goes to expert s mod E (the
    bucket a table is keyed by is then exact)."""
    from .dispatch import dispatch_metadata

    ids_TK = (torch.arange(T * K, device=device) % E).view(T, K).to(torch.int32)
    return dispatch_metadata(ids_TK, E)


def _randn(*shape, device, dtype, scale: float = 1.0):
    return torch.randn(*shape, device=device, dtype=dtype).mul_(scale)


def _dispatch_inputs(d: Dims, device, dtype) -> Dict[str, object]:
    T, D, E, K = (int(d[k]) for k in ("T", "D", "E", "K"))
    meta = _balanced_meta(T, K, E, device)
    return {"meta": meta, "x": _randn(T, D, device=device, dtype=dtype),
            "y": _randn(meta.num_rows, D, device=device, dtype=dtype),
            "w": torch.rand(T, K, device=device, dtype=torch.float32)}


def _rows_inputs(d: Dims, device, dtype) -> Dict[str, object]:
    """Expert-sorted rows: N rows over E experts, N/E each; scale as the routing weight."""
    N, E = int(d["N"]), int(d["E"])
    offsets = torch.arange(0, E + 1, device=device, dtype=torch.int32) * (N // E)
    offsets[-1] = N
    return {"offsets": offsets, "scale": torch.rand(N, device=device, dtype=torch.float32)}


def _gemm_inputs(d: Dims, device, dtype) -> Dict[str, object]:
    N, E, I, O = (int(d[k]) for k in ("N", "E", "I", "O"))
    inp = _rows_inputs(d, device, dtype)
    inp["a"] = _randn(N, I, device=device, dtype=dtype)
    inp["w"] = _randn(E, I, O, device=device, dtype=dtype, scale=I ** -0.5)
    inp["dc"] = _randn(N, O, device=device, dtype=dtype)
    return inp


def _experts_inputs(d: Dims, device, dtype) -> Dict[str, object]:
    T, D, F, E, K = (int(d[k]) for k in ("T", "D", "F", "E", "K"))
    meta = _balanced_meta(T, K, E, device)
    return {"offsets": meta.offsets_E1.contiguous(),
            "gather": (meta.sort_index_N // K).contiguous(),
            "scale": torch.rand(T * K, device=device, dtype=torch.float32),
            "x": _randn(T, D, device=device, dtype=dtype),
            "w1": _randn(E, D, 2 * F, device=device, dtype=dtype, scale=D ** -0.5),
            "w2": _randn(E, F, D, device=device, dtype=dtype, scale=F ** -0.5),
            "dy": _randn(T * K, D, device=device, dtype=dtype),
            "gu": _randn(T * K, 2 * F, device=device, dtype=dtype)}


def _doc_ids(B: int, S: int, device) -> torch.Tensor:
    """Packed documents of halving lengths (S/2, S/4, ... and the rest), int32 [B, S]."""
    lengths, left = [], S
    while left > 1 and len(lengths) < 4:
        lengths.append(left // 2)
        left -= left // 2
    lengths.append(left)
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return ids.to(device=device, dtype=torch.int32)[None].expand(B, S).contiguous()


def _attention_inputs(d: Dims, device, dtype) -> Dict[str, object]:
    """q, k, v as Megatron hands them over ([S, B, H, Dh] viewed as [B, S, H, Dh], as the report
    captures them); for the backward also o, lse (from the table's forward) and dO."""
    from .attention import attention_fwd, gpu_blocks

    B, S, H, Hkv, Dh = (int(d[k]) for k in ("B", "S", "H", "Hkv", "Dh"))
    q, k, v = (_randn(S, B, h, Dh, device=device, dtype=dtype).transpose(0, 1)
               for h in (H, Hkv, Hkv))
    docs = _doc_ids(B, S, device) if d["documents"] else None
    inp = {"q": q, "k": k, "v": v, "docs": docs, "causal": bool(d["causal"]),
           "scale": 1.0 / math.sqrt(Dh)}
    if d.get("backward"):
        inp["o"], inp["lse"] = attention_fwd(q, k, v, inp["causal"], inp["scale"], docs,
                                             gpu_blocks(Dh, int(d.get("capability", 90))))
        inp["do"] = torch.randn_like(inp["o"])
    return inp


# ----------------------------------------------------------------------------- runners


def _run_dispatch_fwd(i, tile):
    from .dispatch import dispatch_fwd

    return dispatch_fwd(i["x"], i["meta"], tile)


def _run_dispatch_fwd_dot(i, tile):
    from .dispatch import dispatch_fwd

    return dispatch_fwd(i["x"], i["meta"], tile, scale_TK=i["w"], dot_ND=i["y"])


def _run_dispatch_bwd(i, tile):
    from .dispatch import dispatch_bwd

    return dispatch_bwd(i["y"], i["meta"], tile, weights_TK=i["w"])


def _run_grouped_mm(i, tile):
    from .grouped_gemm import grouped_mm_fwd

    return grouped_mm_fwd(i["a"], i["w"], i["offsets"], None, i["scale"], blocks=tile)


def _run_dw(i, tile):
    from .grouped_gemm import grouped_mm_dw

    return grouped_mm_dw(i["a"], i["dc"], i["offsets"], None, i["scale"], blocks=tile)


def _run_fc1(i, tile):
    from .experts import swiglu_fc1_fwd

    return swiglu_fc1_fwd(i["x"], i["w1"], i["offsets"], i["gather"], store_preact=True,
                          blocks=tile)


def _run_fc2_bwd(i, tile):
    from .experts import swiglu_fc2_bwd

    return swiglu_fc2_bwd(i["dy"], i["w2"], i["gu"], i["offsets"], i["scale"], blocks=tile)


def _run_attention_fwd(i, tile):
    from .attention import attention_fwd

    return attention_fwd(i["q"], i["k"], i["v"], i["causal"], i["scale"], i["docs"], tile)


def _run_attention_bwd(i, tile):
    from .attention_bwd import attention_bwd

    return attention_bwd(i["do"], None, i["q"], i["k"], i["v"], i["o"], i["lse"], i["causal"],
                         i["scale"], i["docs"], tile)


# ----------------------------------------------------------------------------- the ops


def _ops() -> Dict[str, TileOp]:
    from . import attention as A, dispatch as dp, experts as ex, grouped_gemm as gg

    def cap(d):
        return int(d.get("capability", 90))

    def d_key(d):
        return f"D={d['D']}"

    def gemm_key(d):
        return f"N={d['N']} I={d['I']} O={d['O']}"

    def attn_key(d):
        return f"{d['name']} S={d['S']} Dh={d['Dh']}"

    ops = [
        TileOp("dispatch_fwd", ("_dispatch_fwd_kernel",), lambda d: dp.DISPATCH_FWD_BLOCKS,
               lambda d: dp.DISPATCH_FWD_CANDIDATES, d_key, _rows_cols, _dispatch_inputs,
               _run_dispatch_fwd),
        TileOp("dispatch_fwd_dot", ("_dispatch_fwd_kernel",),
               lambda d: dp.DISPATCH_FWD_DOT_BLOCKS, lambda d: dp.DISPATCH_FWD_DOT_CANDIDATES,
               d_key, _rows_cols, _dispatch_inputs, _run_dispatch_fwd_dot),
        TileOp("dispatch_bwd", ("_dispatch_bwd_kernel",),
               lambda d: dp.dispatch_bwd_gpu_blocks(int(d["D"])),
               lambda d: dp.DISPATCH_BWD_CANDIDATES, d_key, _rows_cols, _dispatch_inputs,
               _run_dispatch_bwd),
        TileOp("grouped_mm", ("_grouped_mm_kernel",), lambda d: gg.GPU_BLOCKS,
               lambda d: gg.GPU_CANDIDATES, gemm_key, _gemm, _gemm_inputs, _run_grouped_mm),
        TileOp("grouped_mm_dw", ("_grouped_mm_dw_kernel",),
               lambda d: gg.dw_gpu_blocks(int(d["N"]) // int(d["E"])),
               lambda d: gg.GPU_DW_CANDIDATES,
               lambda d: f"rows_per_expert={int(d['N']) // int(d['E'])} I={d['I']} O={d['O']}",
               _gemm, _gemm_inputs, _run_dw),
        TileOp("swiglu_fc1", ("_swiglu_fc1_kernel",), lambda d: ex.FC1_GPU_BLOCKS,
               lambda d: ex.FC1_GPU_CANDIDATES, lambda d: f"D={d['D']} F={d['F']}", _gemm,
               _experts_inputs, _run_fc1),
        TileOp("swiglu_fc2_bwd", ("_swiglu_fc2_bwd_kernel",), lambda d: ex.FC2_BWD_GPU_BLOCKS,
               lambda d: ex.FC2_BWD_GPU_CANDIDATES, lambda d: f"D={d['D']} F={d['F']}", _gemm,
               _experts_inputs, _run_fc2_bwd),
        TileOp("attention_fwd", ("_attn_fwd_kernel",),
               lambda d: A.gpu_blocks(int(d["Dh"]), cap(d)),
               lambda d: A.gpu_candidates(int(d["Dh"]), "fwd", cap(d)), attn_key, _attn_fwd,
               _attention_inputs, _run_attention_fwd),
        TileOp("attention_bwd", ("_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"),
               lambda d: A.gpu_blocks(int(d["Dh"]), cap(d)),
               lambda d: A.gpu_candidates(int(d["Dh"]), "bwd", cap(d)), attn_key, _attn_bwd,
               _attention_inputs, _run_attention_bwd),
    ]
    return {op.name: op for op in ops}


@functools.lru_cache(maxsize=None)
def ops() -> Dict[str, TileOp]:
    """Every op, by name (built on first use: the kernel modules are imported then)."""
    return _ops()


def problems(shapes: Mapping[str, object], capability: int = 90
             ) -> List[Tuple[TileOp, Dict[str, object]]]:
    """(op, dims) at the shapes of the report's shape dict (kernels/report.py): the MoE ops at
    the EP=1 path's shapes, dW also at the expert-parallel rank's rows per expert (its table's
    key), the attention ops at each attention entry."""
    table = ops()
    out: List[Tuple[TileOp, Dict[str, object]]] = []
    moe = shapes.get("moe")
    if moe:
        T, D, F = int(moe["tokens"]), int(moe["hidden"]), int(moe["ffn"])
        E, K, ep = int(moe["experts"]), int(moe["top_k"]), int(moe.get("expert_parallel", 1))
        N = T * K
        for name in ("dispatch_fwd", "dispatch_fwd_dot", "dispatch_bwd"):
            out.append((table[name], dict(T=T, D=D, E=E, K=K)))
        out.append((table["swiglu_fc1"], dict(T=T, D=D, F=F, E=E, K=K)))
        out.append((table["grouped_mm"], dict(N=N, I=F, O=D, E=E)))
        out.append((table["swiglu_fc2_bwd"], dict(T=T, D=D, F=F, E=E, K=K)))
        for e in sorted({E, max(1, E // ep)}, reverse=True):  # EP=1, then the EP rank's experts
            out.append((table["grouped_mm_dw"], dict(N=N, I=F, O=D, E=e)))
    for att in shapes.get("attention", []):
        dims = dict(name=att.get("name", "attention"), B=int(att["batch"]), S=int(att["seq"]),
                    H=int(att["heads"]), Hkv=int(att.get("kv_heads", att["heads"])),
                    Dh=int(att["head_dim"]), causal=bool(att["causal"]),
                    documents=bool(att.get("documents")), capability=capability)
        out.append((table["attention_fwd"], dims))
        out.append((table["attention_bwd"], dict(dims, backward=True)))
    return out


def capture_candidates(shapes: Mapping[str, object], capability: int):
    """Every candidate of every op at ``shapes``, launched through its launcher on meta tensors
    and recorded (``report.capture_launches``); only each op's own kernels, under the stage
    ``tiles <op> <key> | <label>``. Needs the interpreter off, as ``report.capture``."""
    from .report import capture_launches, stage

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtype = dtypes[str(shapes.get("dtype", "bf16"))]
    with capture_launches(capability) as launches:
        for op, dims in problems(shapes, capability):
            with stage("build"):  # routing metadata, the forward the backward needs: not kept
                inputs = op.build(dims, torch.device("meta"), dtype)
            for tile in op.candidates(dims):
                with stage(f"tiles {op.name} {op.key(dims)} | {op.label(tile)}"):
                    op.run(inputs, tile)
    return [la for la in launches if la.stage.startswith("tiles ")
            and la.kernel in ops()[la.stage.split()[1]].kernels]
