"""RMSNorm, fused forward and backward: y = w * (x / rms(x)), rms(x) = sqrt(mean(x^2) + eps).

Shape legend: T rows (tokens; any leading shape of x is flattened into T), D model width,
P backward programs.

Numerics (the convention of Hugging Face's LlamaRMSNorm, see kernels/reference/rmsnorm.py):
the statistic rstd = 1/rms is computed in fp32 (fp64 for fp64 inputs, ``acc_dtype``); the
normalized row x * rstd is rounded to x's dtype, then multiplied by the weight in fp32 and
rounded to x's dtype once more. Output dtype = x's dtype, whatever the weight's.

Backward (one kernel, then one deterministic sum), with n = x * rstd and g = grad_y * w:
  grad_x = rstd * (g - n * mean(g * n))       fused per row, in fp32;
  grad_w = sum over rows of grad_y * n         each program sums its contiguous span of rows in
                                               fp32 into its own row of a [P, D] buffer, which
                                               ``.sum(0)`` reduces: no float atomics, so two runs
                                               are bit-identical.
Saved for backward: x and rstd (fp32, one per row): x's bytes + 4 bytes per row of activation
memory (the weight is kept by reference; it is a parameter, alive anyway).

Layers: ``_rms_norm_fwd_kernel`` / ``_rms_norm_bwd_kernel`` -> ``rms_norm_fwd`` /
``rms_norm_bwd`` -> ``RMSNormFunction`` -> ``rms_norm``.

Caution: tested in the Triton interpreter (fp32, bf16, fp64) and compiled for sm90/sm80 without
a GPU (tests/kernels/test_rmsnorm.py); the GPU tiles below are not yet timed on a card.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, check_device, kernel_dtypes, next_pow2, use_interpreter_tiles

# One program holds whole rows (BLOCK_D >= D): 64K columns is 256 KiB of fp32 per row tile, the
# most 32 warps hold at 64 registers per thread per live tile; our widest model has D = 4096.
MAX_D = 65536


@triton.jit
def _round_to_out(v, OUT_DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """v (ACC_DTYPE) rounded to OUT_DTYPE, returned in ACC_DTYPE. With EMULATE_BF16 (bf16 under
    the interpreter, whose fp32 -> bf16 cast truncates: off by one bf16 ulp against a GPU's
    round-to-nearest-even, measured with triton 3.9) the rounding is done on the fp32 bits."""
    if EMULATE_BF16:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # finite inputs: no overflow
        out = bits.to(tl.float32, bitcast=True)
    else:
        out = v.to(OUT_DTYPE).to(v.dtype)
    return out


@triton.jit
def _rms_norm_fwd_kernel(x_TD, w_D, y_TD, rstd_T, T, D, eps, stride_x, stride_y,
                         BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                         EMULATE_BF16: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """y = round(round(x * rstd) * w) and rstd_T = 1 / sqrt(mean(x^2) + eps), BLOCK_T rows per
    program, each row in one BLOCK_D tile."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < T
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)  # int64: T*D may pass 2**31
    x = tl.load(x_TD + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0)
    x = x.to(ACC_DTYPE)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    out_dtype = y_TD.dtype.element_ty
    normed = _round_to_out(x * rstd[:, None], out_dtype, EMULATE_BF16)
    w = tl.load(w_D + cols, mask=col_mask, other=0).to(ACC_DTYPE)
    y = _round_to_out(normed * w[None, :], out_dtype, EMULATE_BF16)
    tl.store(y_TD + rows64[:, None] * stride_y + cols[None, :], y, mask=mask)
    tl.store(rstd_T + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(dy_TD, x_TD, w_D, rstd_T, dx_TD, dw_PD, T, D, ROW_SPAN,
                         stride_dy, stride_x, stride_dx,
                         BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                         EMULATE_BF16: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """Program p: grad_x of rows [p * ROW_SPAN, +ROW_SPAN) (a multiple of BLOCK_T), and its fp32
    partial of grad_w, summed over those rows in row order, into dw_PD[p]."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    w = tl.load(w_D + cols, mask=col_mask, other=0).to(ACC_DTYPE)
    dw = tl.zeros([BLOCK_D], dtype=ACC_DTYPE)
    for r0 in range(pid * ROW_SPAN, pid * ROW_SPAN + ROW_SPAN, BLOCK_T):
        rows = r0 + tl.arange(0, BLOCK_T)
        row_mask = rows < T
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(x_TD + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0)
        dy = tl.load(dy_TD + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0)
        dy = dy.to(ACC_DTYPE)
        rstd = tl.load(rstd_T + rows, mask=row_mask, other=0)
        normed = x.to(ACC_DTYPE) * rstd[:, None]
        # the forward multiplied w by the normalized row rounded to x's dtype: its grad sees that
        dw += tl.sum(dy * _round_to_out(normed, x_TD.dtype.element_ty, EMULATE_BF16), axis=0)
        g = dy * w[None, :]
        mean_gn = tl.sum(g * normed, axis=1) / D
        dx = (g - normed * mean_gn[:, None]) * rstd[:, None]
        dx = _round_to_out(dx, dx_TD.dtype.element_ty, EMULATE_BF16)
        tl.store(dx_TD + rows64[:, None] * stride_dx + cols[None, :], dx, mask=mask)
    tl.store(dw_PD + pid * D + cols, dw, mask=col_mask)


class NormTiles(NamedTuple):
    """A launch of the RMSNorm kernels (``tiles=None`` in the functions below: ``norm_tiles``)."""

    rows: int
    """BLOCK_T: rows per tile, a power of two."""
    num_warps: int
    bwd_programs: int
    """P: backward programs, each owning a contiguous span of rows and one grad_w partial."""


# GPU tiles by BLOCK_D (D padded to a power of two): (largest BLOCK_D, rows per tile, num_warps).
# 16-32 fp32 elements per thread per tile (64 only past D = 16384, wider than any model here):
# the backward holds four such tiles live (x, grad_y, n, g), so 32 keeps it near 128 registers
# without spilling; small
# D takes several rows per tile so a program still moves 16 KiB of bf16. D = 2560 (mm1-3b-moe)
# pads to 4096, 37% of lanes masked: the kernel is memory-bound, masked lanes load nothing.
# Not yet timed on a card.
GPU_TILES = ((256, 16, 4), (1024, 4, 4), (4096, 1, 8), (16384, 1, 16), (MAX_D, 1, 32))
# Backward programs per SM: 4 x 8 warps = 32 resident warps to hide load latency. The [P, D] fp32
# partials are then 528 x 4096 x 4 B = 8.3 MiB on a 132-SM H100 at D = 4096, 2% of the 400 MiB
# the backward moves at T = 16384 in bf16.
BWD_PROGRAMS_PER_SM = 4


def gpu_tiles(T: int, D: int, num_sms: int) -> NormTiles:
    """The GPU launch for T rows of width D on a card with ``num_sms`` SMs."""
    block_d = next_pow2(D)
    rows, warps = next((r, w) for limit, r, w in GPU_TILES if block_d <= limit)
    return NormTiles(rows, warps, max(1, min(triton.cdiv(T, rows), BWD_PROGRAMS_PER_SM * num_sms)))


def norm_tiles(T: int, D: int, device: torch.device) -> NormTiles:
    """The launch for T rows of width D: the interpreter's few large programs, or ``gpu_tiles``
    for this device."""
    if use_interpreter_tiles():  # few, large programs: the interpreter pays per program
        return NormTiles(max(1, min(next_pow2(T), (1 << 20) // next_pow2(D))), 4, 1)
    return gpu_tiles(T, D, torch.cuda.get_device_properties(device).multi_processor_count)


def _rows_2d(t: torch.Tensor, D: int) -> torch.Tensor:
    """[..., D] as [T, D] with unit column stride (a view when the layout allows)."""
    t = t.reshape(-1, D)
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(x_TD: torch.Tensor, weight_D: torch.Tensor) -> int:
    check_device(x_TD, weight_D)
    D = x_TD.shape[-1]
    if weight_D.shape != (D,):
        raise ValueError(f"weight must be [{D}] (x's last dim), got {tuple(weight_D.shape)}")
    if not 0 < D <= MAX_D:
        raise ValueError(f"rms_norm needs 0 < D <= {MAX_D}, got D = {D}")
    return D


def rms_norm_fwd(x_TD: torch.Tensor, weight_D: torch.Tensor, eps: float,
                 tiles: Optional[NormTiles] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y_TD in x's dtype, rstd_T in acc_dtype(x.dtype)) for x [T, D] (any leading shape is
    flattened: y comes back [T, D])."""
    D = _check(x_TD, weight_D)
    x_TD = _rows_2d(x_TD, D)
    T = x_TD.shape[0]
    tiles = tiles or norm_tiles(T, D, x_TD.device)
    y_TD = torch.empty(T, D, dtype=x_TD.dtype, device=x_TD.device)
    rstd_T = torch.empty(T, dtype=acc_dtype(x_TD.dtype), device=x_TD.device)
    dt = kernel_dtypes(x_TD.dtype)
    if T:
        _rms_norm_fwd_kernel[(triton.cdiv(T, tiles.rows),)](
            x_TD, weight_D.contiguous(), y_TD, rstd_T, T, D, float(eps), x_TD.stride(0),
            y_TD.stride(0), BLOCK_T=tiles.rows, BLOCK_D=next_pow2(D),
            EMULATE_BF16=dt.upcast and x_TD.dtype == torch.bfloat16, ACC_DTYPE=dt.acc,
            num_warps=tiles.num_warps)
    return y_TD, rstd_T


def rms_norm_bwd(grad_y_TD: torch.Tensor, x_TD: torch.Tensor, weight_D: torch.Tensor,
                 rstd_T: torch.Tensor, tiles: Optional[NormTiles] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(grad_x_TD in x's dtype, grad_weight_D in the weight's dtype); grad_weight is the sum of
    per-program fp32 partials, reduced by ``.sum(0)`` (deterministic)."""
    D = _check(x_TD, weight_D)
    check_device(x_TD, grad_y_TD, rstd_T)
    x_TD, grad_y_TD = _rows_2d(x_TD, D), _rows_2d(grad_y_TD, D)
    T = x_TD.shape[0]
    if grad_y_TD.shape != x_TD.shape:
        raise ValueError(f"grad_y must be [{T}, {D}], got {tuple(grad_y_TD.shape)}")
    tiles = tiles or norm_tiles(T, D, x_TD.device)
    grad_x_TD = torch.empty(T, D, dtype=x_TD.dtype, device=x_TD.device)
    span = triton.cdiv(triton.cdiv(max(T, 1), tiles.bwd_programs), tiles.rows) * tiles.rows
    programs = triton.cdiv(max(T, 1), span)
    dw_PD = torch.empty(programs, D, dtype=acc_dtype(x_TD.dtype), device=x_TD.device)
    dt = kernel_dtypes(x_TD.dtype)
    _rms_norm_bwd_kernel[(programs,)](
        grad_y_TD, x_TD, weight_D.contiguous(), rstd_T, grad_x_TD, dw_PD, T, D, span,
        grad_y_TD.stride(0), x_TD.stride(0), grad_x_TD.stride(0), BLOCK_T=tiles.rows,
        BLOCK_D=next_pow2(D), EMULATE_BF16=dt.upcast and x_TD.dtype == torch.bfloat16,
        ACC_DTYPE=dt.acc, num_warps=tiles.num_warps)
    return grad_x_TD, dw_PD.sum(0).to(weight_D.dtype)


class RMSNormFunction(torch.autograd.Function):
    """(x [..., D], weight [D]) -> y [..., D]; saves x and rstd (fp32, one per row)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float,
                tiles: Optional[NormTiles] = None):
        D = _check(x, weight)
        x_TD = _rows_2d(x, D)
        y_TD, rstd_T = rms_norm_fwd(x_TD, weight, eps, tiles)
        ctx.save_for_backward(x_TD, weight, rstd_T)
        ctx.tiles = tiles
        return y_TD.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        x_TD, weight, rstd_T = ctx.saved_tensors
        grad_x_TD, grad_w = rms_norm_bwd(grad_y, x_TD, weight, rstd_T, ctx.tiles)
        grad_x = grad_x_TD.view(grad_y.shape) if ctx.needs_input_grad[0] else None
        return grad_x, (grad_w if ctx.needs_input_grad[1] else None), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             tiles: Optional[NormTiles] = None) -> torch.Tensor:
    """RMSNorm over the last dim: x [..., D], weight [D] -> [..., D] in x's dtype, statistics
    in fp32 (see the module docstring for the rounding convention). Differentiable in x and
    weight; saves x's bytes + 4 bytes per row for backward. ``tiles`` overrides the launch."""
    return RMSNormFunction.apply(x, weight, eps, tiles)
