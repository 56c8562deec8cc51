"""Activation recomputation (``train.recompute``) on one process: none, selective and full give
the same loss and the same gradient of every parameter, route every token to the same experts
(router jitter on, so the rerun must restore the RNG), and count MoE statistics once. The
(TP, PP, EP) layouts run in tests/distributed/test_parallel_equivalence.py."""

from __future__ import annotations

import os

import pytest
import torch

from mm1_moe.config import ConfigError, load_config
from mm1_moe.models.builder import build_model_chunks
from mm1_moe.moe.layer import MoELayer
from mm1_moe.moe.router import TopKRouter
from mm1_moe.runtime import initialize, shutdown

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "configs")
MODES = ("none", "selective", "full")
JITTER = "model.decoder.moe.router_jitter=0.1"
S, B = 48, 2


def _config(name, mode, *overrides):
    return load_config(os.path.join(CONFIGS, f"{name}.yaml"),
                       [JITTER, f"train.recompute={mode}", "kernels.moe=torch", *overrides])


def _batch(config):
    """tokens/labels [B, S]; with a ViT, one image per sequence at token 1 (its placeholders)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, 256, (B, S), generator=g)
    batch = dict(tokens=tokens, position_ids=torch.arange(S).expand(B, -1),
                 labels=torch.randint(5, 256, (B, S), generator=g))
    if config.model.image_token_id is not None:
        V, px = config.model.connector.num_tokens, config.model.vision.image_size
        tokens[:, 1:1 + V] = config.model.image_token_id
        batch.update(images=torch.randn(B, 3, px, px, generator=g),
                     images_per_sequence=torch.ones(B, dtype=torch.long))
    return batch


def _loss(model, batch):
    mask = torch.ones_like(batch["tokens"], dtype=torch.bool)
    mask[:, -5:] = False  # padding: left out of the routing statistics (Megatron's padding_mask)
    if "images" in batch:
        per_token = model(batch["tokens"], batch["position_ids"], labels=batch["labels"],
                          images=batch["images"], images_per_sequence=batch["images_per_sequence"],
                          padding_mask=mask)
    else:
        per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                          padding_mask=mask)
    return (per_token * mask).sum() / mask.sum()


def _saved_bytes(model, fn):
    """(fn(), bytes autograd saved for backward during it: distinct storages, parameters left
    out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def _run(name, mode, state=None, overrides=()):
    """(loss, grads by name, router calls [(grad enabled, ids_TK)] per router, MoE metrics,
    core-attention calls, saved bytes, the model's state dict)."""
    config = _config(name, mode, *overrides)
    initialize(config)
    try:
        (model,) = build_model_chunks(config, on_cpu=True)
        if state is not None:
            model.load_state_dict(state)
        routes, attn_calls = {}, []
        for n, m in model.named_modules():
            if isinstance(m, TopKRouter):
                m.register_forward_hook(lambda mod, args, out, n=n: routes.setdefault(n, []).append(
                    (torch.is_grad_enabled(), out.ids_TK.clone())))
            if n.endswith("core_attention"):
                m.register_forward_hook(lambda *_: attn_calls.append(1))
        torch.manual_seed(7)  # router jitter draws from the CPU generator
        loss, saved = _saved_bytes(model, lambda: _loss(model, _batch(config)))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        metrics = [m.metrics.read() for m in model.modules() if isinstance(m, MoELayer)]
        return loss.detach(), grads, routes, metrics, len(attn_calls), saved, model.state_dict()
    finally:
        shutdown()


@pytest.fixture(scope="module", params=["tiny-moe", "tiny-mm1-moe"])
def runs(request):
    base = _run(request.param, "none")
    return {"none": base, **{m: _run(request.param, m, base[-1]) for m in MODES[1:]}}


def test_full_recompute_reuses_the_global_batch_loads(monkeypatch):
    """aux_loss_scope: global_batch with the expert bias on: the rerun in the backward takes the
    running loads its first forward used (one all-reduce per forward, none in the rerun, the
    running total not counted twice), so full recompute gives the run without it."""
    from mm1_moe.moe.balance import LoadBalanceState

    totals = []
    original = LoadBalanceState.global_batch_loss

    def recording(self, route, top_k, recomputing):
        loss = original(self, route, top_k, recomputing)
        totals.append((recomputing, int(self.global_load[-1])))
        return loss

    monkeypatch.setattr(LoadBalanceState, "global_batch_loss", recording)
    balance = ("model.decoder.moe.aux_loss_scope=global_batch", "model.decoder.moe.balance=both")
    base = _run("tiny-moe", "none", overrides=balance)
    assert totals == [(False, B * (S - 5))] * 2  # two MoE layers, the real tokens once
    totals.clear()
    full = _run("tiny-moe", "full", base[-1], overrides=balance)
    assert sorted(totals) == [(False, B * (S - 5))] * 2 + [(True, B * (S - 5))] * 2
    torch.testing.assert_close(full[0], base[0], rtol=1e-6, atol=0)
    for name, grad in base[1].items():
        torch.testing.assert_close(full[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert [m.aux_loss for m in full[3]] == pytest.approx([m.aux_loss for m in base[3]])


@pytest.mark.parametrize("mode", MODES[1:])
def test_loss_and_every_grad_equal_the_run_without_recompute(runs, mode):
    loss, grads = runs["none"][:2]
    got_loss, got_grads = runs[mode][:2]
    # Same ops on the same inputs; only the fc1 rerun's summation order may differ (fp32 ulps).
    torch.testing.assert_close(got_loss, loss, rtol=1e-6, atol=0)
    assert got_grads.keys() == grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_selective_never_reroutes(runs):
    routes = runs["selective"][2]
    assert routes.keys() == runs["none"][2].keys() and routes
    for name, calls in routes.items():
        assert len(calls) == 1, name  # one routing per layer: no rerun of router or all-to-all
        assert torch.equal(calls[0][1], runs["none"][2][name][0][1]), name


def test_full_rerun_routes_bit_identically_with_jitter(runs):
    for name, calls in runs["full"][2].items():
        (first_grad, first), (rerun_grad, rerun) = calls  # the forward, then the backward's rerun
        assert not first_grad and rerun_grad, name
        assert torch.equal(first, rerun), name
        assert torch.equal(first, runs["none"][2][name][0][1]), name


def test_moe_statistics_count_each_forward_once(runs):
    for mode in MODES:
        for got, want in zip(runs[mode][3], runs["none"][3]):
            assert torch.equal(got.tokens_per_expert_E, want.tokens_per_expert_E), mode
            assert got.aux_loss == pytest.approx(want.aux_loss, rel=1e-6), mode
    # 5 padding tokens per sequence are not counted: T * K routed rows over real tokens only
    assert int(runs["full"][3][0].tokens_per_expert_E.sum()) == B * (S - 5) * 2


def test_core_attention_reruns_in_selective_and_full(runs):
    calls = {mode: runs[mode][4] for mode in MODES}
    assert calls["selective"] == calls["full"] == 2 * calls["none"] > 0


def test_each_mode_saves_less_for_backward(runs):
    saved = {mode: runs[mode][5] for mode in MODES}
    # selective drops each MoE layer's fc1 pre-activations (N x 2F) and attention internals;
    # full keeps little more than each layer's input
    assert saved["full"] < saved["selective"] < saved["none"], saved


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_experts_rerun_fc1_and_swiglu_instead_of_saving_them(backend):
    """The selective mode's expert part on each kernels.moe backend: the same output and grads,
    and gate_up_NF2 (N x 2F) no longer saved."""
    if backend == "triton":
        from mm1_moe.kernels.experts import swiglu_experts
    else:
        from mm1_moe.kernels.reference.experts import swiglu_experts_reference as swiglu_experts
    g = torch.Generator().manual_seed(0)
    T, D, F, e, K = 40, 32, 48, 4, 2
    gather_N = torch.randperm(T * K, generator=g) % T
    offsets_e1 = torch.tensor([0, 15, 15, 50, T * K], dtype=torch.int32)
    inputs = [torch.randn(T, D, generator=g), torch.randn(e, D, 2 * F, generator=g) / D ** 0.5,
              torch.randn(e, F, D, generator=g) / F ** 0.5, torch.rand(T * K, generator=g)]
    results = {}
    for recompute in (False, True):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y, saved = _saved_bytes(torch.nn.Module(), lambda: swiglu_experts(
            leaves[0], leaves[1], leaves[2], offsets_e1, gather_N, leaves[3],
            recompute_fc1=recompute))
        y.backward(torch.ones_like(y))
        results[recompute] = (y.detach(), [t.grad for t in leaves], saved)
    (y, grads, saved), (y_re, grads_re, saved_re) = results[False], results[True]
    torch.testing.assert_close(y_re, y, rtol=0, atol=0)
    for grad, grad_re in zip(grads, grads_re):
        torch.testing.assert_close(grad_re, grad, rtol=1e-6, atol=1e-6)
    assert saved - saved_re >= T * K * 2 * F * 4, (saved, saved_re)


def test_recompute_num_layers_must_divide_the_layers_of_a_stage():
    with pytest.raises(ConfigError, match=r"train\.recompute_num_layers \(3\)"):
        _config("tiny-moe", "full", "train.recompute_num_layers=3")
    with pytest.raises(ConfigError, match=r"train\.recompute_num_layers \(0\) must be >= 1"):
        _config("tiny-moe", "none", "train.recompute_num_layers=0")
    assert _config("tiny-moe", "full", "train.recompute_num_layers=2").train.recompute == "full"
    with pytest.raises(ConfigError, match=r"train\.recompute"):
        _config("tiny-moe", "some")
