"""Flash attention: forward and backward TFLOP/s of ours, torch SDPA (flash backend) and
flash-attn (when installed), in the same run, on the decoder and ViT shapes.

FLOPs from the explicit formula (kernels/reference/attention.py: attention_flops): forward
4 * B * Hq * S^2 * Dh, halved for causal, sum(len^2) instead of S^2 for packed documents;
backward 2.5x the forward. Ratios: to the dense bf16 matmul rate measured in this run, and
ours over SDPA.

Targets (H100, bf16): forward >= 400 TFLOP/s and backward >= 300 at head dim 128; on the ViT
shape (head dim 80, 730 tokens, no mask) no slower than SDPA.

Usage: python benchmarks/bench_attention.py [--smoke] [--no-csv] [--sweep]
  --sweep: also time ours over a few tile configurations at the decoder shape (for tuning
  kernels/attention.py: gpu_blocks).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import append_rows, base_parser, ceilings, on_gpu, print_table, time_ms  # noqa: E402

from mm1_moe.kernels.attention import (AttentionBlocks, doc_ids_from_cu_seqlens,  # noqa: E402
                                       flash_attention, gpu_blocks)
from mm1_moe.kernels.reference.attention import attention_flops  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    B: int
    S: int
    Hq: int
    Hkv: int
    Dh: int
    causal: bool
    doc_lengths: Optional[Tuple[int, ...]] = None  # one packed row's documents (B rows alike)


def shapes(smoke: bool) -> List[Shape]:
    if smoke:
        return [Shape("decoder", 1, 64, 2, 1, 16, True), Shape("vit", 1, 37, 2, 2, 80, False),
                Shape("decoder_packed", 1, 64, 2, 1, 16, True, (1, 40, 23))]
    # Decoder: MM1-7B-like attention (32 query heads, 8 kv heads, Dh 128), 16k tokens per step.
    # ViT-H/14 at 378 px: 729 patches + CLS, 16 heads of 80, a micro-batch of 32 images.
    out = [Shape(f"decoder_s{s}", 16384 // s, s, 32, 8, 128, True) for s in (4096, 8192)]
    out += [Shape(f"dh80_s{s}", 16384 // s, s, 16, 16, 80, False) for s in (4096, 8192)]
    out += [Shape("vit_h14", 32, 730, 16, 16, 80, False)]
    # A packed 4096-token MM1 sequence: captions and documents of mixed lengths.
    docs = (700, 37, 1200, 15, 300, 1, 900, 943)
    out += [Shape("decoder_packed_s4096", 4, 4096, 32, 8, 128, True, docs)]
    return out


def _inputs(shape: Shape, device: str, dtype: torch.dtype):
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(shape.B, shape.S, shape.Hq, shape.Dh, device=device, dtype=dtype,
                    generator=gen)
    k = torch.randn(shape.B, shape.S, shape.Hkv, shape.Dh, device=device, dtype=dtype,
                    generator=gen)
    v = torch.randn_like(k)
    doc_ids = None
    if shape.doc_lengths is not None:
        cu = torch.tensor([0] + list(torch.tensor(shape.doc_lengths).cumsum(0)), device=device,
                          dtype=torch.int32)
        doc_ids = doc_ids_from_cu_seqlens(cu, shape.S)[None].expand(shape.B, -1).contiguous()
    return [t.requires_grad_() for t in (q, k, v)], doc_ids


def _ours(blocks: Optional[AttentionBlocks] = None) -> Callable:
    def run(q, k, v, shape, doc_ids):
        return flash_attention(q, k, v, shape.causal, None, doc_ids, blocks=blocks)
    return run


def _sdpa(q, k, v, shape, doc_ids):
    """SDPA on [B, H, S, Dh]; the flash backend when it applies (no explicit mask), else the
    memory-efficient one (packed documents need a block-diagonal mask)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    mask = None
    if doc_ids is not None:
        mask = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
        if shape.causal:
            mask = mask & torch.ones(shape.S, shape.S, dtype=torch.bool, device=q.device).tril()
    backends = [SDPBackend.MATH]
    if on_gpu():
        backends = [SDPBackend.FLASH_ATTENTION] if mask is None else [
            SDPBackend.EFFICIENT_ATTENTION]
    gqa = q.shape[1] != k.shape[1]
    try:
        with sdpa_kernel(backends):
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               is_causal=shape.causal and mask is None,
                                               enable_gqa=gqa)
    except RuntimeError:  # a backend without GQA support: expand k/v (timed, as users would)
        if not gqa:
            raise
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        with sdpa_kernel(backends):
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               is_causal=shape.causal and mask is None)
    return o.transpose(1, 2)


def _flash_attn() -> Optional[Callable]:
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except ImportError:
        return None

    def run(q, k, v, shape, doc_ids):
        if doc_ids is None:
            return flash_attn_func(q, k, v, causal=shape.causal)
        lens = torch.tensor(shape.doc_lengths * shape.B, device=q.device)
        cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
        flat = [t.reshape(-1, t.shape[2], t.shape[3]) for t in (q, k, v)]
        m = max(shape.doc_lengths)
        o = flash_attn_varlen_func(*flat, cu, cu, m, m, causal=shape.causal)
        return o.reshape(q.shape)
    return run


def measure(name: str, fn: Callable, shape: Shape, smoke: bool, device: str,
            dtype: torch.dtype) -> Dict[str, object]:
    (q, k, v), doc_ids = _inputs(shape, device, dtype)
    fwd_ms = time_ms(lambda: fn(q, k, v, shape, doc_ids), smoke)
    o = fn(q, k, v, shape, doc_ids)
    do = torch.randn_like(o)
    bwd_ms = time_ms(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True), smoke)
    fwd_flops = attention_flops(shape.B, shape.S, shape.Hq, shape.Dh, shape.causal,
                                doc_lengths=shape.doc_lengths)
    return {"shape": shape.name, "impl": name, "B": shape.B, "S": shape.S, "Hq": shape.Hq,
            "Hkv": shape.Hkv, "Dh": shape.Dh, "causal": int(shape.causal),
            "docs": len(shape.doc_lengths or ()), "dtype": str(dtype).replace("torch.", ""),
            "fwd_ms": fwd_ms, "bwd_ms": bwd_ms,
            "fwd_tflops": fwd_flops / (fwd_ms * 1e-3) / 1e12,
            "bwd_tflops": 2.5 * fwd_flops / (bwd_ms * 1e-3) / 1e12}


def sweep(shape: Shape, device: str, dtype: torch.dtype) -> List[Dict[str, object]]:
    """Ours over tile candidates around gpu_blocks (GPU only)."""
    base = gpu_blocks(shape.Dh, 90 if torch.cuda.get_device_capability()[0] >= 9 else 80)
    candidates = [base]
    for fwd in ((128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2)):
        candidates.append(AttentionBlocks(fwd[0], fwd[1], base.dkdv_m, base.dkdv_n, base.dq_m,
                                          base.dq_n, fwd[2], fwd[3], base.bwd_warps,
                                          base.bwd_stages))
    for bwd in ((64, 128, 64, 64, 8, 3), (32, 64, 64, 32, 4, 4), (64, 64, 64, 64, 4, 3)):
        candidates.append(AttentionBlocks(base.fwd_m, base.fwd_n, bwd[0], bwd[1], bwd[2],
                                          bwd[3], base.fwd_warps, base.fwd_stages, bwd[4],
                                          bwd[5]))
    rows = []
    for blocks in candidates:
        try:
            row = measure("triton", _ours(blocks), shape, False, device, dtype)
        except Exception as exc:  # noqa: BLE001 - a candidate that does not compile or fit
            print(f"skip {blocks}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        row["blocks"] = str(blocks)
        rows.append(row)
    return rows


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="time ours over tile candidates")
    args = parser.parse_args()
    smoke = args.smoke or not on_gpu()
    device = "cuda" if on_gpu() else "cpu"
    dtype = torch.bfloat16 if on_gpu() else torch.float32  # the interpreter computes bf16 wrongly
    ceil = ceilings(smoke)
    impls = [("triton", _ours()), ("sdpa", _sdpa)]
    fa = _flash_attn() if on_gpu() else None
    if fa is not None:
        impls.append(("flash_attn", fa))
    rows = []
    for shape in shapes(smoke):
        sdpa_row = None
        for name, fn in impls:
            row = measure(name, fn, shape, smoke, device, dtype)
            row["fwd_of_matmul"] = row["fwd_tflops"] / ceil.matmul_tflops
            row["bwd_of_matmul"] = row["bwd_tflops"] / ceil.matmul_tflops
            if name == "sdpa":
                sdpa_row = row
            rows.append(row)
        for row in rows[-len(impls):]:
            row["fwd_vs_sdpa"] = sdpa_row["fwd_ms"] / row["fwd_ms"]
            row["bwd_vs_sdpa"] = sdpa_row["bwd_ms"] / row["bwd_ms"]
    print(f"matmul ceiling {ceil.matmul_tflops:.3g} TFLOP/s ({'smoke' if smoke else device})")
    print_table(rows, ["shape", "impl", "B", "S", "Hq", "Hkv", "Dh", "causal", "fwd_ms",
                       "fwd_tflops", "bwd_ms", "bwd_tflops", "fwd_vs_sdpa", "bwd_vs_sdpa"])
    if args.sweep and on_gpu():
        tuned = sweep(shapes(False)[0], device, dtype)
        print_table(tuned, ["blocks", "fwd_tflops", "bwd_tflops"])
        if not args.no_csv:
            print("rows appended to", append_rows("attention_sweep", tuned, args.out))
    if not args.no_csv:
        print("rows appended to", append_rows("attention", rows, args.out, smoke=smoke))


if __name__ == "__main__":
    main()
