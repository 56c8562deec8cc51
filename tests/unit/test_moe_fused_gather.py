"""The fused expert-parallel-size-1 path (``GatherDispatcher``: the experts read token rows through
the sort, the routing weight scales their output rows, combine sums unweighted) against the
unfused one (``LocalDispatcher``: dispatch copies rows out, combine takes the weighted sum), with
the same weights: outputs, every gradient (input, router, w1, w2), the auxiliary losses and the
metrics, on both kernel backends, with and without capacity drops, with a token mask.

The auxiliary-loss coefficients are 0 here, so the router's gradient comes through the routing
weights alone: the path the fusion moves from combine into the experts' fc2 backward.

Shapes: S sequence, B batch, T = S*B tokens, D width, K top-k, N routed rows."""

import os

import pytest
import torch

from mm1_moe.config import load_config
from mm1_moe.config.megatron import decoder_transformer_config
from mm1_moe.moe import GatherDispatcher, LocalDispatcher, MoELayer
from mm1_moe.runtime import initialize, shutdown

S, B = 13, 2  # 26 tokens: odd, and not a multiple of any block size


@pytest.fixture
def started(configs_dir):
    config = load_config(os.path.join(configs_dir, "tiny-moe.yaml"),
                         ["model.decoder.moe.aux_loss_coeff=0.0",
                          "model.decoder.moe.z_loss_coeff=0.0"])
    initialize(config)
    yield config
    shutdown()


def _pair(config, kernels):
    """(fused, unfused) MoE layers with the same weights; the router spread so top-2 choices
    are decisive and varied (and capacity drops pick by clear margins)."""
    tc = decoder_transformer_config(config, use_cpu_initialization=True)
    torch.manual_seed(0)
    fused = MoELayer(tc, config.model.decoder.moe, kernels=kernels)
    unfused = MoELayer(tc, config.model.decoder.moe, kernels=kernels, fuse_dispatch=False)
    assert isinstance(fused.dispatcher, GatherDispatcher)
    assert type(unfused.dispatcher) is LocalDispatcher
    with torch.no_grad():
        fused.router.weight.normal_(0.0, 0.5)
        unfused.load_state_dict(fused.state_dict())
    return tc, fused, unfused


def _run(layer, x, probe, padding_mask):
    xi = x.clone().requires_grad_(True)
    out, _ = layer(xi, padding_mask=padding_mask)
    (out * probe).sum().backward()
    return {"out": out.detach(), "x": xi.grad, "router": layer.router.weight.grad,
            "w1": layer.experts.w1.grad, "w2": layer.experts.w2.grad}


CASES = {  # (capacity_factor, token mask, masked_tokens)
    "dropless": (None, False, "route"),
    "capacity_drops": (0.5, False, "route"),
    "mask_routed": (None, True, "route"),
    "mask_pass_through_with_drops": (0.75, True, "pass_through"),
}


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_fused_gather_matches_unfused(started, kernels, case):
    capacity_factor, masked, masked_tokens = case
    config = started
    config.model.decoder.moe.capacity_factor = capacity_factor
    config.model.decoder.moe.masked_tokens = masked_tokens
    tc, fused, unfused = _pair(config, kernels)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(S, B, tc.hidden_size, generator=gen)
    probe = torch.randn(S, B, tc.hidden_size, generator=gen)
    mask_BS = (torch.rand(B, S, generator=gen) > 0.3) if masked else None

    got, want = _run(fused, x, probe, mask_BS), _run(unfused, x, probe, mask_BS)
    for name in want:
        assert got[name] is not None and torch.count_nonzero(want[name]) > 0, name
        # fp32. The forward applies the same single product w * y in another kernel and sums
        # K=2 terms (commutative): bit-identical. In the backward the Triton path gets the
        # routing-weight grad as rowdot(h, dy @ w2^T) over F tiles instead of <dy, y> over D,
        # and sums a token's dx rows in another kernel. Measured max |diff| (Triton, all four
        # cases): w1 3.7e-8 (grads up to 0.14), router 6e-9 (1.5e-2), x 2e-9 (6e-3), out and
        # w2 0; the torch backend is bit-identical throughout.
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)
    torch.testing.assert_close(got["out"], want["out"], rtol=0, atol=0)

    a, b = fused.metrics.read(), unfused.metrics.read()
    assert torch.equal(a.tokens_per_expert_E, b.tokens_per_expert_E)
    assert a.dropped == b.dropped and (a.dropped > 0) == (capacity_factor is not None)
    assert (a.aux_loss, a.z_loss) == (b.aux_loss, b.z_loss)


def test_fused_gather_keeps_aux_losses(started):
    """With the auxiliary losses on, the router's gradient (routing weights + aux + z-loss)
    still agrees: the losses are injected on the layer output, upstream of any dispatch."""
    config = started
    config.model.decoder.moe.aux_loss_coeff = 0.01
    config.model.decoder.moe.z_loss_coeff = 0.001
    tc, fused, unfused = _pair(config, "triton")
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(S, B, tc.hidden_size, generator=gen)
    probe = torch.randn(S, B, tc.hidden_size, generator=gen)
    got, want = _run(fused, x, probe, None), _run(unfused, x, probe, None)
    torch.testing.assert_close(got["router"], want["router"], rtol=1e-6, atol=1e-7)


def test_gather_dispatcher_state(started):
    """The state the experts consume: x_TD itself, the token of each sorted slot, and the slot's
    routing weight; dropped slots appear in neither."""
    config = started
    config.model.decoder.moe.capacity_factor = 0.5
    tc, fused, _ = _pair(config, "torch")
    x_TD = torch.randn(S * B, tc.hidden_size)
    route = fused.route(x_TD, None)
    rows, state = fused.dispatch(x_TD, route)
    assert rows is x_TD
    meta, K = state.meta, route.ids_TK.shape[1]
    slots = meta.sort_index_N.long()
    assert state.gather_index_N.dtype == torch.int32 and meta.num_dropped > 0
    assert torch.equal(state.gather_index_N.long(), slots // K)
    assert torch.equal(state.row_scale_N, route.weights_TK.reshape(-1)[slots])
    assert state.row_scale_N.numel() == S * B * K - meta.num_dropped
