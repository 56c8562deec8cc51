"""RMSNorm (kernels/rmsnorm.py, mm1_moe/models/norm.py) against torch.nn.functional.rms_norm,
Hugging Face's LlamaRMSNorm and our plain-torch reference (kernels/reference/rmsnorm.py).

Shape legend: T rows, D model width.

fp32: forward, grad_x and grad_weight at rtol=atol=1e-5 (D-term fp32 sums in another order; the
grad_weight sums 300 rows). bf16: bit-exact against the reference where both round the same
fp32 value (the interpreter path emulates a GPU's round-to-nearest), at most one bf16 ulp apart
where rstd's D-term sum rounds differently, and every output under the ratio rule (error vs an
fp32 reference at most 2x that of the reference run in bf16). On CPU the kernels run in the
Triton interpreter; the compile test builds them for sm90/sm80 in a child process.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

from mm1_moe.kernels import rmsnorm as rn
from mm1_moe.kernels._common import SHARED_MEMORY_LIMIT, next_pow2
from mm1_moe.kernels.reference.rmsnorm import rms_norm_reference
from mm1_moe.kernels.rmsnorm import NormTiles, gpu_tiles, rms_norm

EPS = 1e-5
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_inputs(T, D, dtype=torch.float32, leading=None):
    x = torch.randn(*(leading or (T,)), D, device=DEVICE, dtype=torch.float32) * 2 + 0.3
    w = torch.randn(D, device=DEVICE) * 0.5 + 1  # off its ones init: a wrong w would show
    return x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()


def forward_backward(fn, x, w, grad):
    y = fn(x, w)
    return (y,) + torch.autograd.grad(y, (x, w), grad.to(y.dtype))


def llama_rms_norm(D):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    config = LlamaConfig(hidden_size=D, rms_norm_eps=EPS, num_attention_heads=1)
    return LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps).to(DEVICE)


# (T, D) and what each row exercises; the tiles: the interpreter's one program, GPU-like tiles
# (16 rows, several backward programs) and tiny ones (2 rows, 3 backward programs: partial
# spans, a last program with fewer rows, several partials to sum).
SHAPES = [
    pytest.param(1, 80, id="T1-D80"),
    pytest.param(7, 96, id="T7-below-a-tile-D96"),
    pytest.param(300, 130, id="T300-D130-non-pow2"),
    pytest.param(33, 1, id="T33-D1"),
]
TILES = [pytest.param(None, id="interpreter-tiles"), pytest.param(NormTiles(16, 4, 5), id="16x"),
         pytest.param(NormTiles(2, 4, 3), id="2x")]


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("T,D", SHAPES)
def test_fp32_matches_torch_rms_norm(T, D, tiles):
    x, w = make_inputs(T, D)
    g = torch.randn(T, D, device=DEVICE)
    ours = forward_backward(lambda x, w: rms_norm(x, w, EPS, tiles), x, w, g)
    torch_ = forward_backward(lambda x, w: F.rms_norm(x, (D,), w, EPS), x, w, g)
    for name, a, b in zip(("y", "grad_x", "grad_w"), ours, torch_):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("leading", [(300,), (3, 5, 20)], ids=["T300", "leading-3x5x20"])
def test_fp32_matches_transformers_llama(leading):
    D = 130
    hf = llama_rms_norm(D)
    x, w = make_inputs(None, D, leading=leading)
    with torch.no_grad():
        hf.weight.copy_(w)
    g = torch.randn(*leading, D, device=DEVICE)
    y_hf = hf(x)
    grads_hf = torch.autograd.grad(y_hf, (x, hf.weight), g)
    ours = forward_backward(lambda x, w: rms_norm(x, w, EPS), x, w, g)
    for name, a, b in zip(("y", "grad_x", "grad_w"), ours, (y_hf,) + grads_hf):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def bf16_ulp(t):
    """One bf16 ulp at each element's magnitude (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(t.float().abs().clamp_min(2.0**-126))) - 7)


@pytest.mark.parametrize("tiles", [None, NormTiles(2, 4, 3)], ids=["interpreter-tiles", "2x"])
@pytest.mark.parametrize("T,D", [(300, 130), (7, 96)], ids=["T300-D130", "T7-D96"])
def test_bf16_follows_llama_rounding(T, D, tiles):
    """Forward: HF's LlamaRMSNorm rounds the normalized row to bf16, then multiplies by the
    weight. Ours equals it (and our reference) except where rstd's fp32 sum, taken in another
    order, tips a rounding: then one ulp apart, on fewer than 1% of the elements."""
    x, w = make_inputs(T, D, torch.bfloat16)
    hf = llama_rms_norm(D).to(torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_(w)
        ours, theirs = rms_norm(x, w, EPS, tiles), hf(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert torch.equal(theirs, rms_norm_reference(x, w, EPS))
    diff = (ours.float() - theirs.float()).abs()
    assert bool((diff <= bf16_ulp(theirs)).all())
    assert (diff > 0).float().mean() < 0.01


@pytest.mark.parametrize("T,D", [pytest.param(300, 130, id="T300-D130"),
                                 pytest.param(4096, 4096, id="T4096-D4096",
                                              marks=pytest.mark.gpu_only)])
def test_bf16_ratio_rule(T, D):
    """y, grad_x, grad_w from bf16 inputs: error (max abs vs the fp32 reference on the same
    values) at most 2x that of the reference run in bf16. The kernel keeps every intermediate in
    fp32 and rounds as the reference does, so it is usually well inside."""
    x, w = make_inputs(T, D, torch.bfloat16)
    g = torch.randn(T, D, device=DEVICE).bfloat16()
    ref = lambda x, w: rms_norm_reference(x, w, EPS)  # noqa: E731
    want = forward_backward(ref, x.detach().float().requires_grad_(),
                            w.detach().float().requires_grad_(), g.float())
    ours = forward_backward(lambda x, w: rms_norm(x, w, EPS), x, w, g)
    base = forward_backward(ref, x, w, g)
    for name, a, b, r in zip(("y", "grad_x", "grad_w"), ours, base, want):
        assert a.dtype == torch.bfloat16, name
        err, base_err = (a.float() - r).abs().max(), (b.float() - r).abs().max()
        assert err <= 2 * base_err, f"{name}: {err:.3g} > 2 x reference bf16 {base_err:.3g}"


def test_weight_grad_in_weight_dtype_and_output_in_x_dtype():
    x, _ = make_inputs(9, 48, torch.bfloat16)
    w = (torch.rand(48, device=DEVICE) + 0.5).requires_grad_()  # fp32 weight on bf16 x
    y = rms_norm(x, w, EPS)
    grad_x, grad_w = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    assert (y.dtype, grad_x.dtype, grad_w.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    torch.testing.assert_close(y, rms_norm_reference(x, w, EPS), rtol=0, atol=0)


def test_gradcheck_fp64():
    x = torch.randn(5, 7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    for tiles in (None, NormTiles(2, 4, 2)):
        assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, EPS, tiles), (x, w),
                                        eps=1e-6, atol=1e-8)


def test_backward_is_deterministic_and_has_no_atomics():
    """Two backward runs are bit-identical; on a GPU that follows from the code, which the
    second assert guards: grad_w partials are summed by .sum(0), never by float atomics."""
    x, w = make_inputs(300, 130)
    g = torch.randn(300, 130, device=DEVICE)
    tiles = NormTiles(2, 4, 7)
    first = forward_backward(lambda x, w: rms_norm(x, w, EPS, tiles), x, w, g)
    second = forward_backward(lambda x, w: rms_norm(x, w, EPS, tiles), x, w, g)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert "tl.atomic" not in inspect.getsource(rn)


def test_saves_x_and_fp32_rstd_only():
    """A memory planner counts x's bytes + 4 per row (the weight is a parameter, kept anyway)."""
    x, w = make_inputs(None, 64, torch.bfloat16, leading=(3, 5))
    y = rms_norm(x, w, EPS)
    saved = [t for t in y.grad_fn.saved_tensors]
    activations = [t for t in saved if t.data_ptr() != w.data_ptr()]
    assert activations[0].data_ptr() == x.data_ptr()  # x itself, no copy
    assert activations[1].dtype == torch.float32 and activations[1].shape == (15,)
    assert sum(t.numel() * t.element_size() for t in activations) == x.numel() * 2 + 4 * 15


def test_non_contiguous_input_and_gradient():
    x, w = make_inputs(40, 70)
    xt = x.detach().t().contiguous().t()[:, :70]  # a column-major view: unit stride along T
    y = rms_norm(xt.requires_grad_(), w, EPS)
    y.sum().backward()  # an expanded (stride-0) gradient
    ref = xt.detach().requires_grad_()
    F.rms_norm(ref, (70,), w.detach(), EPS).sum().backward()
    torch.testing.assert_close(y, F.rms_norm(xt, (70,), w, EPS), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xt.grad, ref.grad, rtol=1e-5, atol=1e-5)


def test_errors():
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"weight must be \[8\]"):
        rms_norm(x, torch.ones(6, device=DEVICE))
    with pytest.raises(ValueError, match="D <= 65536"):
        rms_norm(torch.randn(1, 65537, device=DEVICE), torch.ones(65537, device=DEVICE))


def test_gpu_tile_table():
    """Every D up to MAX_D has a tile of at most 64 fp32 elements per thread; the backward runs
    at most 4 programs per SM, fewer when there are fewer row tiles."""
    for D in (1, 80, 256, 257, 1280, 2560, 4096, 16384, rn.MAX_D):
        tiles = gpu_tiles(16384, D, num_sms=132)
        assert tiles.rows * next_pow2(D) <= 64 * 32 * tiles.num_warps, D
        assert tiles.bwd_programs == min(-(-16384 // tiles.rows), 4 * 132), D
    assert gpu_tiles(5, 4096, num_sms=132).bwd_programs == 5


# ---------------------------------------------------------------------------------------------
# The module: Megatron's norm signature, its spec machinery, sequence_parallel on the weight.


def transformer_config(**overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=1, hidden_size=64, num_attention_heads=4, normalization="RMSNorm",
                layernorm_epsilon=EPS, use_cpu_initialization=True)
    return TransformerConfig(**{**base, **overrides})


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["no-sp", "sp"])
def test_module_built_from_a_megatron_spec(sequence_parallel):
    """As transformer_layer.py builds its norms: build_module(spec, config, hidden_size, eps)."""
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from mm1_moe.models.norm import RMSNorm

    tp = 2 if sequence_parallel else 1  # Megatron refuses SP without TP
    config = transformer_config(sequence_parallel=sequence_parallel,
                                tensor_model_parallel_size=tp, params_dtype=torch.bfloat16)
    norm = build_module(ModuleSpec(module=RMSNorm), config=config, hidden_size=64, eps=EPS)
    assert norm.weight.sequence_parallel is sequence_parallel
    assert norm.weight.dtype == torch.bfloat16 and bool((norm.weight == 1).all())
    assert norm.param_init("weight").kind == "ones"


@pytest.mark.parametrize("kernel", ["triton", "torch"])
def test_module_matches_functional(kernel):
    from mm1_moe.models.norm import RMSNorm

    norm = RMSNorm(transformer_config(), 64, eps=EPS, kernel=kernel).to(DEVICE)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    x = torch.randn(6, 2, 64, device=DEVICE, requires_grad=True)  # Megatron's [S, B, D]
    norm(x).square().sum().backward()
    x_ref = x.detach().requires_grad_()
    w_ref = norm.weight.detach().requires_grad_()
    rms_norm_reference(x_ref, w_ref, EPS).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.weight.grad, w_ref.grad, rtol=1e-5, atol=1e-5)


def test_module_refusals():
    from mm1_moe.models.norm import RMSNorm

    with pytest.raises(ValueError, match="only 'RMSNorm'"):
        RMSNorm(transformer_config(normalization="LayerNorm"), 64)
    with pytest.raises(ValueError, match="only 'RMSNorm'"):
        RMSNorm(transformer_config(), 64, normalization="LayerNorm")
    with pytest.raises(ValueError, match="zero_centered_gamma"):
        RMSNorm(transformer_config(), 64, zero_centered_gamma=True)
    with pytest.raises(ValueError, match="zero_centered_gamma"):
        RMSNorm(transformer_config(layernorm_zero_centered_gamma=True), 64)
    with pytest.raises(ValueError, match="kernel must be one of"):
        RMSNorm(transformer_config(), 64, kernel="apex")


# ---------------------------------------------------------------------------------------------
# Compile check: both kernels for sm90 and sm80 with bf16 data at every GPU tile of the table.
# kernels.compile_check compiles in a child process without the interpreter (under it tl.sum
# and our jit helper cannot be lowered), with an empty cache; the child starts with this
# module's first test and runs on the second core while the interpreter tests run.

COMPILE_TYPES = dict(x_TD="*bf16", w_D="*bf16", y_TD="*bf16", rstd_T="*fp32", dy_TD="*bf16",
                     dx_TD="*bf16", dw_PD="*fp32", T="i32", D="i32", ROW_SPAN="i32", eps="fp32",
                     stride_x="i32", stride_y="i32", stride_dy="i32", stride_dx="i32")
COMPILE_BLOCK_D = [limit for limit, _, _ in rn.GPU_TILES]
COMPILE_KERNELS = ["_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel"]


@pytest.fixture(scope="module", autouse=True)
def _compile_job(request):
    import triton.language as tl

    from mm1_moe.kernels.compile_check import CompileJob, CompileRequest

    if not any(item.originalname == "test_kernels_compile_for_gpu"
               for item in request.session.items):
        yield None  # compile tests deselected: don't spend a core on them
        return
    keys, requests = [], []
    for block_d in COMPILE_BLOCK_D:
        tiles = gpu_tiles(16384, block_d, num_sms=132)
        constexprs = dict(BLOCK_T=tiles.rows, BLOCK_D=block_d, EMULATE_BF16=False,
                          ACC_DTYPE=tl.float32)
        for name in COMPILE_KERNELS:
            for cap in (90, 80):
                keys.append(f"{name}-D{block_d}-sm{cap}")
                requests.append(CompileRequest.for_kernel(
                    getattr(rn, name), COMPILE_TYPES, constexprs, cap, num_warps=tiles.num_warps))
    job = CompileJob(requests)
    yield keys, job
    job.cancel()


@pytest.fixture(scope="module")
def compiled(_compile_job):
    keys, job = _compile_job
    return dict(zip(keys, job.results(timeout=300)))


@pytest.mark.parametrize("capability", [90, 80], ids=["sm90", "sm80"])
@pytest.mark.parametrize("block_d", COMPILE_BLOCK_D, ids=[f"D{d}" for d in COMPILE_BLOCK_D])
@pytest.mark.parametrize("kernel", COMPILE_KERNELS)
def test_kernels_compile_for_gpu(compiled, kernel, block_d, capability):
    """An int means it compiled (an error comes back as text), within the card's shared
    memory (the row reductions use a little of it)."""
    shared = compiled[f"{kernel}-D{block_d}-sm{capability}"]
    assert isinstance(shared, int), shared
    assert shared <= SHARED_MEMORY_LIMIT[capability]
