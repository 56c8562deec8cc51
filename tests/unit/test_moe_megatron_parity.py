"""Our MoE layer against Megatron-core's own ``MoELayer`` (alltoall dispatcher, SequentialMLP
experts, dropless), with the same weights copied across: outputs and every gradient (input,
router, experts; auxiliary and z losses included) within fp32 tolerance."""

import dataclasses
import os

import pytest
import torch

from mm1_moe.config import load_config
from mm1_moe.config.megatron import decoder_transformer_config
from mm1_moe.moe import MoELayer
from mm1_moe.runtime import initialize, shutdown

S, B = 24, 2  # 48 tokens


@pytest.fixture
def started(configs_dir):
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    config = load_config(os.path.join(configs_dir, "tiny-moe.yaml"))
    initialize(config)
    # Megatron's MoE layer scales its aux-loss gradient by a process-global scale that a
    # training run earlier in this process leaves at 1 / micro-batches: the oracle runs at 1
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))
    yield config
    shutdown()


def _megatron_layer(transformer_config, order: str):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer as MegatronMoELayer
    from megatron.core.transformer.moe.moe_layer import MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    cfg = dataclasses.replace(
        transformer_config, moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.01,
        moe_z_loss_coeff=0.001, moe_router_pre_softmax=order == "softmax_topk")
    experts = ModuleSpec(module=SequentialMLP, submodules=MLPSubmodules(
        linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))
    return MegatronMoELayer(cfg, MoESubmodules(experts=experts))


def _copy_weights(ours: MoELayer, theirs) -> None:
    with torch.no_grad():
        ours.router.weight.copy_(theirs.router.weight)
        for i, expert in enumerate(theirs.experts.local_experts):
            ours.experts.w1[i].copy_(expert.linear_fc1.weight.t())  # [2F, D] -> [D, 2F]
            ours.experts.w2[i].copy_(expert.linear_fc2.weight.t())  # [D, F] -> [F, D]


def _expert_grads(theirs):
    w1 = torch.stack([e.linear_fc1.weight.grad.t() for e in theirs.experts.local_experts])
    w2 = torch.stack([e.linear_fc2.weight.grad.t() for e in theirs.experts.local_experts])
    return w1, w2


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("order", ["softmax_topk", "topk_softmax"])
def test_matches_megatron_moe_layer(started, order, kernels):
    config = started
    config.model.decoder.moe.router_order = order
    tc = decoder_transformer_config(config, use_cpu_initialization=True)
    torch.manual_seed(0)
    theirs = _megatron_layer(tc, order)
    ours = MoELayer(tc, config.model.decoder.moe, kernels=kernels)
    with torch.no_grad():  # spread the router so top-2 choices are decisive and varied
        theirs.router.weight.normal_(0.0, 0.5)
    _copy_weights(ours, theirs)

    x = torch.randn(S, B, tc.hidden_size)
    probe = torch.randn(S, B, tc.hidden_size)
    results = []
    for layer in (theirs, ours):
        xi = x.clone().requires_grad_(True)
        out, _ = layer(xi)
        (out * probe).sum().backward()
        results.append((out.detach(), xi.grad))
    (out_m, dx_m), (out_o, dx_o) = results
    # fp32 throughout; both sum each token's K expert outputs, in different orders (~1e-7)
    torch.testing.assert_close(out_o, out_m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx_o, dx_m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.router.weight.grad, theirs.router.weight.grad,
                               rtol=1e-4, atol=1e-6)
    w1_m, w2_m = _expert_grads(theirs)
    torch.testing.assert_close(ours.experts.w1.grad, w1_m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.experts.w2.grad, w2_m, rtol=1e-5, atol=1e-6)


def test_metrics_count_only_real_tokens(started):
    config = started
    tc = decoder_transformer_config(config, use_cpu_initialization=True)
    layer = MoELayer(tc, config.model.decoder.moe, kernels="torch")
    x = torch.randn(S, B, tc.hidden_size)
    mask_BS = torch.ones(B, S, dtype=torch.bool)
    mask_BS[:, S // 2:] = False  # e.g. image placeholders: routed, not counted
    out, _ = layer(x, padding_mask=mask_BS)
    assert out.shape == x.shape
    metrics = layer.metrics.read()
    k = config.model.decoder.moe.top_k
    assert int(metrics.tokens_per_expert_E.sum()) == int(mask_BS.sum()) * k
    summary = metrics.summary()
    assert summary["load_min"] <= summary["load_max"] and summary["dropped"] == 0
    assert layer.metrics.read() is None  # reading resets


def test_capacity_drops_are_counted(started):
    config = started
    config.model.decoder.moe.capacity_factor = 0.5
    tc = decoder_transformer_config(config, use_cpu_initialization=True)
    layer = MoELayer(tc, config.model.decoder.moe, kernels="triton")
    out, _ = layer(torch.randn(S, B, tc.hidden_size))
    metrics = layer.metrics.read()
    # capacity = ceil(48 * 2 / 4 * 0.5) = 12 rows per expert: at least half the 96 slots drop
    assert metrics.dropped >= 48
    assert torch.isfinite(out).all()


def test_pass_through_tokens_skip_the_experts(started):
    config = started
    config.model.decoder.moe.masked_tokens = "pass_through"
    tc = decoder_transformer_config(config, use_cpu_initialization=True)
    layer = MoELayer(tc, config.model.decoder.moe, kernels="torch")
    x = torch.randn(S, B, tc.hidden_size, requires_grad=True)
    mask_BS = torch.rand(B, S) > 0.3
    out, _ = layer(x, padding_mask=mask_BS)
    mask_SB = mask_BS.t()
    assert torch.count_nonzero(out[~mask_SB]) == 0  # skipped: the MoE adds nothing
    kept = x.detach()[mask_SB]  # the kept tokens alone give the same outputs
    alone, _ = layer(kept.view(-1, 1, tc.hidden_size))
    torch.testing.assert_close(out[mask_SB], alone.view(-1, tc.hidden_size))
    out.sum().backward()
    assert torch.count_nonzero(x.grad[~mask_SB]) == 0
