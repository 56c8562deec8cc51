"""Flash attention (``mm1_moe.kernels.attention``) against torch ``scaled_dot_product_attention``
with explicit causal / block-diagonal masks (``kernels/reference/attention.py``): outputs, lse,
dQ, dK, dV; fp64 gradcheck; tile skipping; the sm90/sm80 compile; the GPU ratio rule.

Shape legend: B batch, S sequence, Hq / Hkv query / kv heads, Dh head dim.
On CPU the kernels run in the Triton interpreter (kernels/__init__.py sets TRITON_INTERPRET).
"""

import os
import subprocess
import sys

import pytest
import torch

from mm1_moe.kernels.attention import (INTERPRET_BLOCKS, AttentionBlocks, doc_ids_from_cu_seqlens,
                                       flash_attention, flash_attention_varlen, gpu_blocks)
from mm1_moe.kernels.reference.attention import (attention_lse_reference, attention_reference,
                                                 doc_ids_from_cu_seqlens_reference)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The launcher's GPU tiles (sm90), here in the interpreter: exercises the masks at real sizes.
# (On a GPU these fp32 tests take the launcher's fp32 tiles: bf16-sized ones overflow.)
GPU_TILES = gpu_blocks(128, 90) if DEVICE == "cpu" else None


def _docs(*lengths, device=DEVICE):
    """doc ids [1, sum(lengths)] int32 of consecutive documents of these lengths."""
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(
        device=device, dtype=torch.int32)[None]


def _qkv(B, S, Hq, Hkv, Dh, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(B, S, Hq, Dh), (B, S, Hkv, Dh), (B, S, Hkv, Dh)]
    return [torch.randn(s, generator=gen, dtype=dtype).to(DEVICE).requires_grad_() for s in shapes]


def _forward_backward(fn, q, k, v, seed=1):
    o, lse = fn(q, k, v)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed)).to(o)
    return (o, lse) + torch.autograd.grad(o, (q, k, v), do)


# Each row: B, S, Hq, Hkv, Dh, causal, document lengths per batch row (None: no documents),
# tiles (None: the launcher's choice) -- and what it exercises.
GRID = {
    "S97_not_block_multiple_causal_gqa4_dh64_gpu_tiles": (1, 97, 4, 1, 64, True, None, GPU_TILES),
    "S257_bidirectional_mha_dh80_padded_gpu_tiles": (1, 257, 2, 2, 80, False, None, GPU_TILES),
    "S257_causal_docs_one_token_and_long_gqa8": (1, 257, 8, 1, 32, True, [(1, 150, 1, 105)],
                                                  None),
    "S1025_causal_docs_longer_than_block_gqa2": (1, 1025, 2, 1, 16, True,
                                                 [(1, 300, 1, 1, 500, 222)], None),
    "B2_bidirectional_docs_differ_per_row_dh128": (2, 97, 2, 1, 128, False,
                                                   [(40, 57), (1, 95, 1)], None),
    "S1_single_token_causal": (2, 1, 2, 1, 64, True, None, None),
    "S13_below_block_all_one_token_docs": (1, 13, 2, 2, 16, False, [(1,) * 13], None),
}


@pytest.mark.parametrize("B,S,Hq,Hkv,Dh,causal,doc_lengths,blocks", GRID.values(), ids=GRID.keys())
def test_matches_sdpa_reference(B, S, Hq, Hkv, Dh, causal, doc_lengths, blocks):
    q, k, v = _qkv(B, S, Hq, Hkv, Dh)
    docs = None if doc_lengths is None else torch.cat([_docs(*row) for row in doc_lengths])
    scale = 0.7 / Dh ** 0.5  # not the default, so a dropped scale shows
    got = _forward_backward(lambda q, k, v: flash_attention(
        q, k, v, causal, scale, docs, return_lse=True, blocks=blocks), q, k, v)
    want = _forward_backward(lambda q, k, v: (
        attention_reference(q, k, v, causal, scale, docs),
        attention_lse_reference(q, k, causal, scale, docs)), q, k, v)
    # fp32 on both sides: measured max errors 1e-6 (o, lse) to 6e-6 (dK, dV at S=1025), on
    # values of magnitude 1e0-1e1; a wrong mask or tile bound gives errors of 1e-1 or more.
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


# fp64 gradcheck (fast mode) of o and lse together on tiny ragged shapes; 16-row tiles so that
# S=35 spans three tiles per axis.
TINY = AttentionBlocks(16, 16, 16, 16, 16, 16)
GRADCHECK = {
    "causal_docs_gqa2_three_tiles": (1, 35, 2, 1, 16, True, (5, 1, 20, 9), TINY),
    "bidirectional_docs_gqa3_dh20_padded": (1, 21, 3, 1, 20, False, (1, 17, 3), TINY),
    "causal_batch2_one_tile": (2, 9, 2, 2, 16, True, None, None),
}


@pytest.mark.parametrize("B,S,Hq,Hkv,Dh,causal,doc_lengths,blocks", GRADCHECK.values(),
                         ids=GRADCHECK.keys())
def test_gradcheck_fp64(B, S, Hq, Hkv, Dh, causal, doc_lengths, blocks):
    q, k, v = _qkv(B, S, Hq, Hkv, Dh, dtype=torch.float64)
    docs = None if doc_lengths is None else _docs(*doc_lengths).expand(B, S)
    assert torch.autograd.gradcheck(
        lambda q, k, v: flash_attention(q, k, v, causal, 0.3, docs, return_lse=True,
                                        blocks=blocks), (q, k, v), fast_mode=True)


def test_varlen_matches_document_masked_reference():
    cu_seqlens = torch.tensor([0, 1, 40, 41, 97], dtype=torch.int32, device=DEVICE)
    T = 103  # 6 tokens past cu[-1]: one more segment, as doc_ids_from_cu_seqlens documents
    doc_ids = doc_ids_from_cu_seqlens(cu_seqlens, T)
    assert torch.equal(doc_ids.cpu(), doc_ids_from_cu_seqlens_reference(cu_seqlens.cpu(), T))
    q, k, v = (t[0].detach().requires_grad_() for t in _qkv(1, T, 4, 2, 32))
    got = _forward_backward(lambda q, k, v: flash_attention_varlen(
        q, k, v, cu_seqlens, causal=True, return_lse=True), q, k, v)
    want = _forward_backward(lambda q, k, v: (
        attention_reference(q[None], k[None], v[None], True, None, doc_ids[None])[0],
        attention_lse_reference(q[None], k[None], True, None, doc_ids[None])[0]), q, k, v)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_lse_alone_is_differentiable():
    """Only lse used (o gets no gradient): dQ, dK match the reference's logsumexp gradients."""
    q, k, v = _qkv(1, 50, 2, 1, 16)
    docs = _docs(20, 30)
    w = torch.randn(1, 2, 50, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    lse = flash_attention(q, k, v, True, None, docs, return_lse=True)[1]
    got = torch.autograd.grad((lse * w).sum(), (q, k, v), allow_unused=True)
    want = torch.autograd.grad((attention_lse_reference(q, k, True, None, docs) * w).sum(), (q, k))
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-4)
    assert got[2] is None or not got[2].any()  # v does not enter lse


def test_megatron_sbhd_views_need_no_copy_and_match_contiguous():
    """[S, B, H, Dh] tensors passed as permuted [B, S, H, Dh] views: same bits as contiguous
    inputs, and the output keeps q's memory layout (so Megatron's [S, B, H*Dh] view is free)."""
    q, k, v = (t.detach() for t in _qkv(2, 70, 4, 2, 32))
    views = [t.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3).requires_grad_()
             for t in (q, k, v)]
    dense = [t.clone().requires_grad_() for t in (q, k, v)]
    fn = lambda q, k, v: flash_attention(q, k, v, True, return_lse=True)  # noqa: E731
    got, want = _forward_backward(fn, *views), _forward_backward(fn, *dense)
    assert got[0].permute(1, 0, 2, 3).is_contiguous()
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _poisoned_run(causal, docs, nan_rows_qdo, nan_rows_kv):
    """o, dq, dk, dv with NaN planted in q/dO rows ``nan_rows_qdo`` and k/v rows ``nan_rows_kv``
    (S=128, two 64-row tiles per axis)."""
    q, k, v = (t.detach() for t in _qkv(1, 128, 2, 1, 16))
    do = torch.ones_like(q)
    for t in (q, do):
        t[:, nan_rows_qdo] = float("nan")
    for t in (k, v):
        t[:, nan_rows_kv] = float("nan")
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o = flash_attention(q, k, v, causal, None, docs, blocks=INTERPRET_BLOCKS)
    return (o,) + torch.autograd.grad(o, (q, k, v), do)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on the planted NaN
def test_skipped_tiles_are_never_read():
    """Tiles outside a tile's documents or past the causal diagonal are skipped, not masked (a
    masked NaN still gives 0 * NaN = NaN in p @ V): NaN planted there must not reach the tile."""
    first, second = slice(0, 64), slice(64, 128)
    # Two 64-token documents, bidirectional: document 1 is all NaN, document 0 stays finite.
    o, dq, dk, dv = _poisoned_run(False, _docs(64, 64), second, second)
    assert all(torch.isfinite(t[:, first]).all() for t in (o, dq, dk, dv))
    # Causal: query tile 0 never reads key tile 1 ...
    o, dq, _, _ = _poisoned_run(True, None, slice(0, 0), second)
    assert torch.isfinite(o[:, first]).all() and torch.isfinite(dq[:, first]).all()
    # ... and key tile 1 never reads query tile 0.
    o, dq, dk, dv = _poisoned_run(True, None, first, slice(0, 0))
    assert all(torch.isfinite(t[:, second]).all() for t in (o, dq, dk, dv))


def test_bad_inputs_are_refused():
    q, k, v = (t.detach() for t in _qkv(1, 8, 3, 2, 16))
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        flash_attention(q, k, v)
    q, k, v = (t.detach() for t in _qkv(1, 8, 2, 1, 16))
    with pytest.raises(ValueError, match="doc_ids_BS must be"):
        flash_attention(q, k, v, doc_ids_BS=torch.zeros(1, 7, dtype=torch.int32))
    if DEVICE == "cpu":  # on GPU the order check is a device-side assert (no host sync)
        with pytest.raises(RuntimeError, match="non-decreasing"):
            flash_attention(q, k, v, doc_ids_BS=torch.tensor([[0, 0, 1, 1, 0, 2, 2, 2]]))
    q, k, v = (t.detach() for t in _qkv(1, 8, 2, 1, 256))
    with pytest.raises(ValueError, match="head dim 256"):
        flash_attention(q, k, v)


# kernels.compile_check compiles in a child process without TRITON_INTERPRET: kernels that call
# other @triton.jit helpers cannot be compiled from interpreted functions. Runtime launches
# specialise 16-divisible integers and 16-aligned pointers (tt.divisibility); the compile gets the
# same hints (aligned_ints), else the compiler cannot vectorise the K/V loads into cp.async,
# skips the software pipelining and under-reports shared memory (65 KB instead of 230 KB).
_POINTERS = {n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr",
                                  "dk_ptr", "dv_ptr")}
_POINTERS.update(lse_ptr="*fp32", delta_ptr="*fp32", dlse_ptr="*fp32", docs_ptr="*i32",
                 ranges_ptr="*i32")


def _compile_requests(cap):
    """Dh=128 with causal + documents: the largest tiles and every code path (head dims 64 and
    80 use the same or smaller tiles; masks take no shared memory); and the preprocess."""
    import triton.language as tl

    from mm1_moe.kernels import attention as A, attention_bwd as AB
    from mm1_moe.kernels.compile_check import CompileRequest

    def types(kernel):
        return {n: _POINTERS.get(n, "fp32" if n.endswith("scale") else "i32")
                for n in kernel.arg_names}

    Dh, causal = 128, True
    b, bd = A.gpu_blocks(Dh, cap), A.next_pow2(Dh)
    requests = {}
    for name, (kernel, bm, bn, warps, stages) in {
            "fwd": (A._attn_fwd_kernel, b.fwd_m, b.fwd_n, b.fwd_warps, b.fwd_stages),
            "dkdv": (AB._attn_bwd_dkdv_kernel, b.dkdv_m, b.dkdv_n, b.bwd_warps, b.bwd_stages),
            "dq": (AB._attn_bwd_dq_kernel, b.dq_m, b.dq_n, b.bwd_warps, b.bwd_stages)}.items():
        const = dict(CAUSAL=causal, HAS_DOCS=causal, PAD_D=bd != Dh, UPCAST=False,
                     ACC_DTYPE=tl.float32, PRECISION="tf32", BM=bm, BN=bn, BD=bd)
        requests[f"{name}_dh{Dh}"] = CompileRequest.for_kernel(
            kernel, types(kernel), const, cap, num_warps=warps, num_stages=stages,
            aligned_ints=True)
    kernel = AB._attn_bwd_preprocess_kernel
    requests["preprocess"] = CompileRequest.for_kernel(
        kernel, {n: _POINTERS.get(n, "i32") for n in kernel.arg_names},
        dict(HAS_DLSE=True, ACC_DTYPE=tl.float32, BS=AB.PREPROCESS_ROWS, BD=128), cap,
        aligned_ints=True)
    return requests


def test_kernels_compile_for_sm90_and_sm80_within_shared_memory():
    from mm1_moe.kernels.compile_check import compile_many

    requests = {(cap, name): req for cap in (90, 80)
                for name, req in _compile_requests(cap).items()}
    # compile_many raises if any exceeds the card's limit
    shared = dict(zip(requests, compile_many(list(requests.values()))))
    for cap in (90, 80):
        # The forward's K and V tiles must be buffered num_stages deep (bf16), or the hints did
        # not reach the compiler and the loop is not pipelined.
        b = gpu_blocks(128, cap)
        assert shared[cap, "fwd_dh128"] >= b.fwd_stages * 2 * b.fwd_n * 128 * 2, (cap, shared)


def test_benchmark_smoke_runs():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_attention.py"),
                           "--smoke", "--no-csv"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "triton" in proc.stdout and "sdpa" in proc.stdout


def _check_ratio_rule(B, S, Hq, Hkv, Dh, causal, doc_lengths):
    """bf16 inputs: each of o, dq, dk, dv has at most 2x the error (max abs, against the fp32
    reference) of the same torch reference code run in bf16."""
    q32, k32, v32 = _qkv(B, S, Hq, Hkv, Dh)
    docs = None if doc_lengths is None else _docs(*doc_lengths).expand(B, S).contiguous()
    ref = lambda q, k, v: (attention_reference(q, k, v, causal, None, docs), None)  # noqa: E731
    want = _forward_backward(ref, q32, k32, v32)
    bf = [t.detach().bfloat16().requires_grad_() for t in (q32, k32, v32)]
    got = _forward_backward(lambda q, k, v: flash_attention(q, k, v, causal, None, docs,
                                                            return_lse=True), *bf)
    base = _forward_backward(ref, *bf)
    for name, g, b, w in zip(("o", "lse", "dq", "dk", "dv"), got, base, want):
        if name == "lse":
            continue
        assert g.dtype == torch.bfloat16, name
        err = (g.float() - w).abs().max().item()
        base_err = (b.float() - w).abs().max().item()
        assert err <= 2 * base_err, f"{name}: {err:.3g} > 2 x torch bf16 {base_err:.3g}"


def test_bf16_inputs_upcast_in_the_interpreter():
    """bf16 in and out on CPU: the interpreter path upcasts after each load (it computes bf16
    dots wrongly), so the ratio rule holds here too, at a tiny shape."""
    _check_ratio_rule(1, 100, 2, 1, 80, True, (1, 40, 1, 58))


# GPU: the ratio rule in bf16, at the launcher's own tiles.
RATIO = {
    "decoder_S1025_causal_docs_gqa4_dh128": (2, 1025, 8, 2, 128, True, (1, 300, 1, 1, 500, 222)),
    "vit_S730_bidirectional_dh80": (4, 730, 16, 16, 80, False, None),
    "S4096_causal_gqa8_dh128": (1, 4096, 16, 2, 128, True, None),
}


@pytest.mark.gpu_only
@pytest.mark.parametrize("B,S,Hq,Hkv,Dh,causal,doc_lengths", RATIO.values(), ids=RATIO.keys())
def test_bf16_ratio_rule(B, S, Hq, Hkv, Dh, causal, doc_lengths):
    _check_ratio_rule(B, S, Hq, Hkv, Dh, causal, doc_lengths)
