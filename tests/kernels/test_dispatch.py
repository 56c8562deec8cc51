"""Routing metadata, dispatch and combine (kernels/dispatch.py, kernels/combine.py) against the
plain-torch reference (kernels/reference/dispatch.py) and Megatron-core's permute/unpermute.

Shape legend: T tokens, D model width, E experts, K top-k, N = T*K routed rows.

Index outputs (metadata, dispatch) must match bit-exactly. Combine sums K products in the same
order as the reference, in fp32: compared at rtol=atol=1e-6 (a GPU's FMA contraction may differ
by an ulp). On CPU the kernels run in the Triton interpreter; the compile test builds them for
sm90/sm80 in a subprocess (see test_kernels_compile_for_gpu).
"""

from __future__ import annotations


import pytest
import torch

from mm1_moe.kernels._common import next_pow2
from mm1_moe.kernels.combine import combine
from mm1_moe.kernels.dispatch import (DISPATCH_BWD_CANDIDATES, DISPATCH_FWD_CANDIDATES,
                                      DISPATCH_FWD_DOT_CANDIDATES, dispatch, dispatch_bwd,
                                      dispatch_bwd_gpu_blocks, dispatch_fwd, dispatch_metadata,
                                      route_blocks)
from mm1_moe.kernels.reference.dispatch import combine_ref, dispatch_metadata_ref, dispatch_ref


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


META_FIELDS = ("sorted_expert_ids_N", "sort_index_N", "inverse_TK", "offsets_E1", "counts_E",
               "num_dropped", "capacity", "num_tokens", "top_k")


def make_ids(T, K, E, pattern, seed=0):
    """[T, K] expert ids, distinct within a token (as top-k gives them)."""
    g = torch.Generator().manual_seed(seed)
    if pattern == "one_expert":  # every token's first choice is expert E // 2
        ids = torch.rand(T, E, generator=g).topk(K).indices
        first = torch.full((T,), E // 2)
        swap = ids == first[:, None]  # keep ids distinct: move E // 2 to column 0
        ids[swap] = ids[:, 0].expand(K, T).T[swap]
        ids[:, 0] = first
        return ids
    if pattern == "empty_experts":  # only experts 1, 5 and 9 of E=16 receive tokens
        subset = torch.tensor([1, 5, 9])
        return subset[torch.rand(T, len(subset), generator=g).topk(K).indices]
    return torch.rand(T, E, generator=g).topk(K).indices


# (T, K, E, pattern): what each row exercises is in its id.
ROUTES = [
    pytest.param(1, 1, 4, "random", id="T1-K1"),
    pytest.param(5, 2, 7, "random", id="T5-below-block-primeE7"),
    pytest.param(257, 2, 7, "random", id="T257-primeE7-K2"),
    pytest.param(257, 2, 64, "random", id="T257-E64-K2"),
    pytest.param(33, 1, 8, "random", id="T33-K1"),
    pytest.param(16, 6, 6, "random", id="T16-K-equals-E6"),
    pytest.param(100, 1, 7, "one_expert", id="all-tokens-one-expert-K1"),
    pytest.param(64, 2, 5, "one_expert", id="all-tokens-one-expert-K2"),
    pytest.param(50, 2, 16, "empty_experts", id="experts-with-no-tokens"),
    pytest.param(0, 2, 4, "random", id="T0"),
]
# Metadata kernel tiles: the interpreter default (one program), the GPU launch sizes, and tiny
# tiles (16 slots, 2 blocks per prefix step) that force many blocks and a multi-step prefix.
ROUTE_BLOCKS = ["interpreter", "gpu", "tiny"]


def route_tiles(mode, T, K, E):
    if mode == "gpu":
        return route_blocks(max(T * K, 1), next_pow2(E), interpret=False)
    return {"interpreter": None, "tiny": (16, 2)}[mode]


def assert_meta_equal(meta, ref):
    for name in META_FIELDS:
        a, b = getattr(meta, name), getattr(ref, name)
        if torch.is_tensor(a):
            assert a.dtype == torch.int32 and torch.equal(a, b), name
        else:
            assert a == b, name


def check_invariants(meta, ids_TK):
    T, K = ids_TK.shape
    kept = meta.inverse_TK >= 0
    slots = kept.nonzero().squeeze(1)
    assert torch.equal(meta.sort_index_N[meta.inverse_TK[slots].long()].long(), slots)
    assert torch.equal(meta.offsets_E1[1:], torch.cumsum(meta.counts_E, 0).int())
    assert meta.offsets_E1[0] == 0 and meta.offsets_E1[-1] == meta.num_rows
    flat_ids = ids_TK.reshape(-1)
    assert torch.equal(meta.sorted_expert_ids_N.long(), flat_ids[meta.sort_index_N.long()])
    assert meta.num_rows + meta.num_dropped == T * K == meta.inverse_TK.numel()
    assert int(kept.sum()) == meta.num_rows
    if meta.capacity is None:
        assert meta.num_dropped == 0 and int(meta.counts_E.sum()) == T * K
    else:
        assert bool((meta.counts_E <= meta.capacity).all())
    for e in range(meta.num_experts):  # stable: ascending slots within each expert
        seg = meta.sort_index_N[meta.offsets_E1[e]:meta.offsets_E1[e + 1]]
        assert bool((seg[1:] > seg[:-1]).all())


@pytest.mark.parametrize("mode", ROUTE_BLOCKS)
@pytest.mark.parametrize("T,K,E,pattern", ROUTES)
def test_metadata_matches_reference(T, K, E, pattern, mode):
    ids = make_ids(T, K, E, pattern)
    meta = dispatch_metadata(ids, E, blocks=route_tiles(mode, T, K, E))
    assert_meta_equal(meta, dispatch_metadata_ref(ids, E))
    check_invariants(meta, ids)


def test_metadata_int32_ids_and_repeated_experts():
    """int32 ids; a token may even name one expert twice (the sort does not care)."""
    ids = torch.randint(0, 7, (97, 3), generator=torch.Generator().manual_seed(1))
    meta = dispatch_metadata(ids.int(), 7, blocks=(16, 2))
    assert_meta_equal(meta, dispatch_metadata_ref(ids, 7))


# (T, K, E, pattern, capacity_factor)
CAPACITY = [
    pytest.param(257, 2, 7, "random", 1.0, id="T257-E7-cf1.0"),
    pytest.param(257, 2, 64, "random", 0.5, id="T257-E64-cf0.5"),
    pytest.param(100, 1, 7, "one_expert", 1.25, id="one-expert-K1-cf1.25"),
    pytest.param(64, 2, 5, "one_expert", 1.0, id="one-expert-K2-cf1.0"),
    pytest.param(50, 2, 16, "empty_experts", 2.0, id="empty-experts-cf2.0"),
    pytest.param(16, 6, 6, "random", 0.4, id="K-equals-E-cf0.4"),
    pytest.param(5, 2, 7, "random", 4.0, id="T5-nothing-dropped"),
]


@pytest.mark.parametrize("mode", ["interpreter", "tiny"])
@pytest.mark.parametrize("T,K,E,pattern,factor", CAPACITY)
def test_capacity_matches_reference(T, K, E, pattern, factor, mode):
    ids = make_ids(T, K, E, pattern)
    # probs on a coarse grid: many ties, which must go to the lower slot
    probs = torch.randint(0, 5, (T, K), generator=torch.Generator().manual_seed(2)) / 4
    meta = dispatch_metadata(ids, E, factor, probs, blocks=route_tiles(mode, T, K, E))
    ref = dispatch_metadata_ref(ids, E, factor, probs)
    assert_meta_equal(meta, ref)
    check_invariants(meta, ids)
    # the dropped rows are the lowest-prob ones of their expert (ties: the higher slots)
    p, flat = probs.reshape(-1), ids.reshape(-1)
    for e in range(E):
        mine = (flat == e).nonzero().squeeze(1)
        kept = mine[meta.inverse_TK[mine] >= 0]
        dropped = mine[meta.inverse_TK[mine] < 0]
        assert kept.numel() == min(mine.numel(), meta.capacity)
        if kept.numel() and dropped.numel():  # rank by (prob descending, slot ascending)
            assert max((-float(p[s]), int(s)) for s in kept) < \
                min((-float(p[s]), int(s)) for s in dropped)


def test_capacity_matches_megatron():
    """Megatron-core's apply_router_token_dropping (drop_policy='probs') keeps the same slots
    when probs are distinct (its topk breaks ties arbitrarily)."""
    moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    T, K, E, factor = 257, 2, 7, 0.8
    ids = make_ids(T, K, E, "random")
    probs = torch.rand(T, K, generator=torch.Generator().manual_seed(3)) + 0.01
    meta = dispatch_metadata(ids, E, factor, probs)
    assert meta.capacity == moe_utils.get_capacity(T * K, E, factor) and meta.num_dropped > 0
    probs_TE = torch.zeros(T, E).scatter(1, ids, probs)
    routing_map = torch.zeros(T, E, dtype=torch.bool).scatter(1, ids, True)
    _, final_map = moe_utils.apply_router_token_dropping(probs_TE, routing_map, K, factor)
    kept_TK = (meta.inverse_TK >= 0).view(T, K)
    assert torch.equal(torch.zeros(T, E, dtype=torch.bool).scatter(1, ids, kept_TK), final_map)
    x = torch.randn(T, 9)
    permuted, _, _ = moe_utils.permute(x, final_map)
    assert torch.equal(dispatch(x, meta), permuted)


def test_megatron_permute_unpermute():
    """Megatron-core's permute/unpermute (its unfused, CPU-capable path) as an outside oracle:
    same row order (by expert, token order within an expert) and the same weighted combine."""
    moe_utils = pytest.importorskip("megatron.core.transformer.moe.moe_utils")
    T, K, E, D = 257, 2, 7, 33
    ids = make_ids(T, K, E, "random")
    weights = torch.softmax(torch.randn(T, K), -1)
    x = torch.randn(T, D)
    meta = dispatch_metadata(ids, E)
    routing_map = torch.zeros(T, E, dtype=torch.bool).scatter(1, ids, True)
    permuted, _, sorted_indices = moe_utils.permute(x, routing_map)
    assert torch.equal(meta.sort_index_N.long() // K, sorted_indices)
    assert torch.equal(dispatch(x, meta), permuted)
    y = torch.randn(T * K, D)
    probs_TE = torch.zeros(T, E).scatter(1, ids, weights)
    expected = moe_utils.unpermute(y, sorted_indices, x.shape, probs=probs_TE,
                                   routing_map=routing_map)
    # Megatron adds a token's rows in expert order, we in k order: an ulp apart
    torch.testing.assert_close(combine(y, weights, meta), expected, rtol=1e-6, atol=1e-6)


def test_combine_keeps_y_for_backward_only_when_the_weights_need_a_grad():
    """An unweighted combine (the fused EP=1 path) must not hold a [N, D] copy until backward."""
    T, K, E, D = 9, 2, 3, 8
    meta = dispatch_metadata(make_ids(T, K, E, "random"), E)
    y = torch.randn(T * K, D, requires_grad=True)
    weights = torch.rand(T, K, requires_grad=True)
    saved = lambda out: [t for t in out.grad_fn.saved_tensors if t is not None]  # noqa: E731
    assert [t.shape for t in saved(combine(y, None, meta))] == []
    assert y.shape in [t.shape for t in saved(combine(y, weights, meta))]
    assert saved(combine(y, weights.detach(), meta))[0].shape == weights.shape


ROW_BLOCKS = [pytest.param(None, id="interpreter-tiles"), pytest.param((32, 16), id="32x16-tiles")]


@pytest.mark.parametrize("blocks", ROW_BLOCKS)
@pytest.mark.parametrize("T,K,E,pattern", ROUTES)
def test_dispatch_combine_match_reference(T, K, E, pattern, blocks):
    ids = make_ids(T, K, E, pattern)
    meta = dispatch_metadata(ids, E)
    D = 33  # odd, and over two 16-column tiles (T=257: over eight 32-row tiles)
    x = torch.randn(T, D)
    assert torch.equal(dispatch(x, meta, blocks), dispatch_ref(x, meta))
    y, w = torch.randn(T * K, D), torch.rand(T, K)
    tol = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(combine(y, w, meta, blocks), combine_ref(y, w, meta), **tol)
    torch.testing.assert_close(combine(y, None, meta, blocks), combine_ref(y, None, meta), **tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dispatch_is_an_exact_copy_in_every_dtype(dtype):
    ids = make_ids(97, 2, 7, "random")
    meta = dispatch_metadata(ids, 7)
    x = torch.randn(97, 45).to(dtype)
    out = dispatch(x, meta, (32, 16))
    assert out.dtype == dtype and torch.equal(out, dispatch_ref(x, meta))


def test_row_kernels_at_gpu_tiles():
    """The launchers at every GPU tile candidate (the tables' picks among them; masks on partial
    row and column tiles: D = 1500 is no multiple of any column block)."""
    T, K, E, D = 257, 2, 7, 1500
    ids = make_ids(T, K, E, "random")
    probs = torch.rand(T, K)
    meta = dispatch_metadata(ids, E, 1.0, probs)
    x, w = torch.randn(T, D), torch.rand(T, K)
    y = torch.randn(meta.num_rows, D)
    assert dispatch_bwd_gpu_blocks(4096) in DISPATCH_BWD_CANDIDATES
    assert dispatch_bwd_gpu_blocks(2560) in DISPATCH_BWD_CANDIDATES
    for tile in DISPATCH_FWD_CANDIDATES:
        assert torch.equal(dispatch_fwd(x, meta, tile), dispatch_ref(x, meta)), tile
    for tile in DISPATCH_BWD_CANDIDATES:
        torch.testing.assert_close(dispatch_bwd(y, meta, tile, weights_TK=w),
                                   combine_ref(y, w, meta), rtol=1e-6, atol=1e-6)
    # grad_w: 1500-term fp32 dot products vs fp64; error bound ~sqrt(D) * 2**-24 * sum|x*y|
    terms = dispatch_ref(x, meta).double() * y.double()
    expected_w = torch.zeros(T * K, dtype=torch.float64)
    expected_w[meta.sort_index_N.long()] = terms.sum(1)
    bound = torch.zeros(T * K, dtype=torch.float64)
    bound[meta.sort_index_N.long()] = 1e-6 * terms.abs().sum(1)
    for tile in DISPATCH_FWD_DOT_CANDIDATES:
        grad_y, grad_w = dispatch_fwd(x, meta, tile, scale_TK=w, dot_ND=y)
        torch.testing.assert_close(grad_y, dispatch_ref(x, meta) * w.reshape(-1)[
            meta.sort_index_N.long()][:, None], rtol=1e-6, atol=1e-6)
        assert bool(((grad_w.double() - expected_w).abs() <= bound).all()), tile


def test_combine_of_one_choice_per_token():
    """K = 1 (the expert-parallel path's local combine): the unrolled K loop runs once."""
    ids = make_ids(50, 1, 5, "random")
    meta = dispatch_metadata(ids, 5)
    y, w = torch.randn(50, 40), torch.rand(50, 1)
    for blocks in (None, (4, 1024), (8, 16)):
        torch.testing.assert_close(combine(y, w, meta, blocks), combine_ref(y, w, meta),
                                   rtol=1e-6, atol=1e-6)


# Tiny ragged shapes for fp64 gradcheck: (T, K, E, D, capacity_factor)
GRADCHECK = [
    pytest.param(5, 2, 3, 3, None, id="T5-K2-E3-D3"),
    pytest.param(7, 3, 5, 2, 0.6, id="T7-K3-E5-D2-dropped-slots"),
]


@pytest.mark.parametrize("T,K,E,D,factor", GRADCHECK)
def test_gradcheck_fp64(T, K, E, D, factor):
    ids = make_ids(T, K, E, "random")
    meta = dispatch_metadata(ids, E, factor, torch.rand(T, K, dtype=torch.float64))
    assert (meta.num_dropped > 0) == (factor is not None)
    opts = dict(fast_mode=True, eps=1e-6, atol=1e-8)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    y = torch.randn(meta.num_rows, D, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    for blocks in (None, (2, 2)):
        assert torch.autograd.gradcheck(lambda x: dispatch(x, meta, blocks), (x,), **opts)
        assert torch.autograd.gradcheck(lambda y, w: combine(y, w, meta, blocks), (y, w), **opts)
        assert torch.autograd.gradcheck(lambda y: combine(y, None, meta, blocks), (y,), **opts)


@pytest.mark.parametrize("factor", [None, 0.75], ids=["dropless", "capacity"])
@pytest.mark.parametrize("blocks", ROW_BLOCKS)
def test_grads_match_reference_autograd_fp32(blocks, factor):
    T, K, E, D = 257, 2, 7, 33
    ids = make_ids(T, K, E, "random")
    meta = dispatch_metadata(ids, E, factor, torch.rand(T, K))
    x = torch.randn(T, D, requires_grad=True)
    w = torch.rand(T, K, requires_grad=True)
    expert_scale = torch.randn(meta.num_rows, 1)  # stands in for the experts between the two

    def run(dispatch_fn, combine_fn):
        out = combine_fn(dispatch_fn(x) * expert_scale, w)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, D)).sum(), (x, w))
        return (out,) + grads

    ours = run(lambda x: dispatch(x, meta, blocks), lambda y, w: combine(y, w, meta, blocks))
    ref = run(lambda x: dispatch_ref(x, meta), lambda y, w: combine_ref(y, w, meta))
    for a, b in zip(ours, ref):  # fp32; grad_w is a 33-term dot product
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if factor is not None:
        dropped = (meta.inverse_TK < 0).view(T, K)
        assert dropped.any() and bool((ours[2][dropped] == 0).all())


def test_deterministic():
    T, K, E, D = 257, 2, 64, 33
    ids = make_ids(T, K, E, "random")
    probs = torch.rand(T, K)
    x, w = torch.randn(T, D), torch.rand(T, K)

    def run():
        meta = dispatch_metadata(ids, E, 0.9, probs, blocks=(16, 2))
        xs = x.clone().requires_grad_()
        ws = w.clone().requires_grad_()
        out = combine(dispatch(xs, meta), ws, meta)
        out.backward(torch.ones_like(out))
        return [getattr(meta, f) for f in META_FIELDS[:5]] + [out, xs.grad, ws.grad]

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


def test_round_trip_identity_experts():
    """combine(dispatch(x), weights summing to 1 per token) == x when every expert is the
    identity (dropless)."""
    T, K, E, D = 257, 2, 7, 33
    meta = dispatch_metadata(make_ids(T, K, E, "random"), E)
    x = torch.randn(T, D)
    w = torch.softmax(torch.randn(T, K), -1)
    torch.testing.assert_close(combine(dispatch(x, meta), w, meta), x, rtol=1e-6, atol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="expert ids"):
        dispatch_metadata(torch.tensor([[0, 7]]), 7)
    with pytest.raises(ValueError, match="probs_TK"):
        dispatch_metadata(torch.tensor([[0, 1]]), 7, capacity_factor=1.0)
    meta = dispatch_metadata(torch.tensor([[0, 1]]), 7)
    with pytest.raises(ValueError, match=r"\[2, D\]"):
        combine(torch.randn(3, 4), None, meta)
    with pytest.raises(ValueError, match="x_TD"):
        dispatch(torch.randn(2, 4), meta)


@pytest.mark.parametrize("T,K,E,D", [
    pytest.param(257, 2, 7, 64, id="small-also-in-interpreter"),
    pytest.param(4096, 2, 64, 4096, id="T4096-E64-D4096", marks=pytest.mark.gpu_only),
    pytest.param(1025, 8, 64, 1024, id="T1025-K8-E64", marks=pytest.mark.gpu_only),
])
def test_bf16_ratio_rule(T, K, E, D):
    """bf16 inputs, fp32 accumulation: the kernel's error vs an fp32 reference is at most 2x
    that of the same torch reference run in bf16. Dispatch is a copy: exact."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ids = make_ids(T, K, E, "random").to(dev)
    meta = dispatch_metadata(ids, E)
    assert_meta_equal(meta, dispatch_metadata_ref(ids, E))
    x = torch.randn(T, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    assert torch.equal(dispatch(x, meta), dispatch_ref(x, meta))
    y = torch.randn(T * K, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.softmax(torch.randn(T, K, device=dev), -1).requires_grad_()
    g = torch.randn(T, D, device=dev, dtype=torch.bfloat16)

    def outputs(fn, y, w):
        out = fn(y, w, meta)
        grads = torch.autograd.grad(out, (y, w), g.to(out.dtype))
        return [out.float()] + [t.float() for t in grads]

    ref32 = outputs(combine_ref, y.detach().float().requires_grad_(), w)
    ours = outputs(combine, y, w)
    ref16 = outputs(combine_ref, y, w.to(torch.bfloat16))
    for a, b16, r in zip(ours, ref16, ref32):
        assert (a - r).abs().max() <= 2 * (b16 - r).abs().max() + 1e-6


def _compile_requests(capability):
    """Every kernel variant for sm_<capability> with bf16 data at the tiles the launchers pick
    on a GPU (T*K = 32K routed slots; D, e.g. 4096, is a runtime argument and the row kernels
    loop over it)."""
    import triton.language as tl

    from mm1_moe.kernels import dispatch as d
    from mm1_moe.kernels.compile_check import CompileRequest

    route_sig = dict(ids_N="*i64", counts_BE="*i32", start_BE="*i32", counts_E="*i32",
                     offsets_E1="*i32", sort_index_N="*i32", sorted_expert_ids_N="*i32",
                     inverse_N="*i32", N="i32", B="i32", E="i32")
    row_sig = dict(src_TD="*bf16", sort_index_N="*i32", scale_TK="*fp32", dot_ND="*bf16",
                   dot_TK="*fp32", out_ND="*bf16", src_ND="*bf16", inverse_TK="*i32",
                   weights_TK="*fp32", out_TD="*bf16", N="i32", T="i32", D="i32",
                   D_SPAN="i32", stride_src="i32", stride_out="i32", stride_dot="i32")
    jobs = []
    for e_pad in (8, 256):  # the extremes of the one-hot tile: [1024, 8] and [32, 256]
        block_n, block_b = d.route_blocks(32768, e_pad, interpret=False)
        jobs += [(d._route_count_kernel, route_sig, dict(BLOCK_N=block_n, E_PAD=e_pad)),
                 (d._route_prefix_kernel, route_sig, dict(BLOCK_B=block_b, E_PAD=e_pad)),
                 (d._route_scatter_kernel, route_sig, dict(BLOCK_N=block_n, E_PAD=e_pad))]
    f32 = tl.float32
    for (bn, bd), scale, dot in ((d.DISPATCH_FWD_BLOCKS, False, False),
                                 (d.DISPATCH_FWD_DOT_BLOCKS, True, True)):
        jobs.append((d._dispatch_fwd_kernel, row_sig, dict(K=2, BLOCK_N=bn, BLOCK_D=bd,
                     HAS_SCALE=scale, HAS_DOT=dot, ACC_DTYPE=f32)))
    bt, bd = d.dispatch_bwd_gpu_blocks(4096)
    for weights in (False, True):
        jobs.append((d._dispatch_bwd_kernel, row_sig, dict(K=2, BLOCK_T=bt, BLOCK_D=bd,
                     HAS_WEIGHTS=weights, ACC_DTYPE=f32)))
    return [CompileRequest.for_kernel(kernel, sig, constexprs, capability)
            for kernel, sig, constexprs in jobs]


def test_kernels_compile_for_gpu():
    """compile_many raises on a compile error or a shared-memory overflow (it compiles in a
    child process without the interpreter: triton 3.9 cannot lower tl.sum/tl.cumsum there)."""
    from mm1_moe.kernels.compile_check import compile_many

    shared = compile_many(_compile_requests(90) + _compile_requests(80))
    assert len(shared) == 20, shared


def test_reference_combine_of_no_rows_stays_on_the_graph():
    """An expert-parallel rank whose experts got no rows must still run the backward (its
    all-to-alls are collective): the combine of zero rows keeps the autograd graph."""
    from mm1_moe.kernels.reference.dispatch import combine_ref, dispatch_metadata_ref

    meta = dispatch_metadata_ref(torch.zeros(0, 1, dtype=torch.int32), 2)  # nothing received
    y = torch.zeros(0, 4, requires_grad=True)
    out = combine_ref(y, None, meta)
    out.sum().backward()  # raised "does not require grad" when the graph was cut
    assert y.grad is not None and y.grad.shape == (0, 4)
