"""The MoE decoder against an outside reference: `transformers` MixtralForCausalLM with random
weights, converted by our interop functions (both MoE kernel backends). Also the converters'
strictness, and run-to-run determinism of the Triton MoE path (forward and backward)."""

import os

import pytest
import torch

from mm1_moe.config import load_config
from mm1_moe.interop import (
    InteropError,
    load_mixtral_,
    megatron_from_mixtral,
    mixtral_config,
    mixtral_from_megatron,
)
from mm1_moe.models.builder import build_model_chunks
from mm1_moe.runtime import initialize, shutdown

from _reference_models import assert_decoder_logits_match, loads_every_parameter, perturbed  # noqa: E402

transformers = pytest.importorskip("transformers")

# Mixtral-expressible tiny MoE: every layer MoE, renormalised top-k; 5 experts (prime, so no
# power-of-two block size divides them), top-2; vocab 250 exercises the vocab padding.
MIXTRAL = ["model.decoder.moe.layer_freq=1", "model.decoder.moe.router_order=topk_softmax",
           "model.decoder.moe.num_experts=5", "model.decoder.moe.top_k=2",
           "model.decoder.vocab_size=250"]


def _config(configs_dir, *overrides):
    return load_config(os.path.join(configs_dir, "tiny-moe.yaml"), [*MIXTRAL, *overrides])


def _random_mixtral(config, seed=0):
    torch.manual_seed(seed)
    hf_config = mixtral_config(config)
    hf_config._experts_implementation = "eager"  # the per-expert loop of modeling_mixtral.py
    return perturbed(transformers.MixtralForCausalLM(hf_config))


CASES = {
    "torch_kernels": ["kernels.moe=torch"],
    "triton_kernels": ["kernels.moe=triton"],
    # softmax over all E, top-k, renormalise: Mixtral's own formula, equal to topk_softmax
    "softmax_topk_normalized": ["kernels.moe=torch", "model.decoder.moe.router_order=softmax_topk",
                                "model.decoder.moe.normalize_topk=true"],
}


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_logits_match_transformers_mixtral(configs_dir, overrides):
    config = _config(configs_dir, *overrides)
    initialize(config)
    try:
        hf = _random_mixtral(config)
        (ours,) = build_model_chunks(config, on_cpu=True)
        loaded = loads_every_parameter(
            ours, lambda: load_mixtral_([ours], hf.state_dict(), config))
        assert loaded == len(list(ours.parameters()))
        # fp32 end to end; measured max abs error 9e-8 (all three cases) on logits of magnitude
        # ~0.35; swapping gate and up in the converter gives 5e-3, so 1e-5 has a wide margin
        assert_decoder_logits_match(ours, hf, config)
    finally:
        shutdown()


def test_state_dict_round_trip_is_exact(configs_dir):
    config = _config(configs_dir)
    hf = _random_mixtral(config).state_dict()
    ours = megatron_from_mixtral(hf, config)
    assert ours["decoder.layers.2.mlp.experts.w1"].shape == (5, 64, 256)  # [E, D, 2F]
    assert ours["decoder.layers.2.mlp.experts.w2"].shape == (5, 128, 64)  # [E, F, D]
    back = mixtral_from_megatron(ours, config)
    assert back.keys() == {k for k in hf if "rotary" not in k}
    for key, value in back.items():
        assert torch.equal(value, hf[key]), key
    # and ours -> HF -> ours
    again = megatron_from_mixtral(back, config)
    assert again.keys() == ours.keys()
    for key, value in again.items():
        assert torch.equal(value, ours[key]), key


def test_missing_extra_and_misshaped_tensors_are_named(configs_dir):
    config = _config(configs_dir)
    hf = dict(_random_mixtral(config).state_dict())
    missing = {k: v for k, v in hf.items() if k != "model.layers.1.mlp.experts.down_proj"}
    with pytest.raises(InteropError, match=r"missing.*model\.layers\.1\.mlp\.experts\.down_proj"):
        megatron_from_mixtral(missing, config)
    extra = dict(hf, **{"model.layers.9.mlp.gate.weight": torch.zeros(1)})
    with pytest.raises(InteropError, match=r"unexpected.*model\.layers\.9\.mlp\.gate\.weight"):
        megatron_from_mixtral(extra, config)
    # [E, D, 2F] instead of [E, 2F, D]: a transposed expert tensor is named, not reshaped
    bad = dict(hf, **{"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(5, 64, 256)})
    with pytest.raises(InteropError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj: "
                                           r"shape \(5, 64, 256\), expected \(5, 256, 64\)"):
        megatron_from_mixtral(bad, config)
    bad = dict(hf, **{"model.layers.3.mlp.gate.weight": torch.zeros(4, 64)})
    with pytest.raises(InteropError, match=r"model\.layers\.3\.mlp\.gate\.weight: shape \(4, 64\)"):
        megatron_from_mixtral(bad, config)
    state = megatron_from_mixtral(hf, config)
    del state["decoder.layers.2.mlp.router.weight"]
    with pytest.raises(InteropError, match=r"decoder\.layers\.2\.mlp\.router\.weight.*missing"):
        mixtral_from_megatron(state, config)


@pytest.mark.parametrize("overrides, message", [
    pytest.param(["model.decoder.moe.router_order=softmax_topk"], "router_order",
                 id="softmax_topk-not-renormalised"),
    pytest.param(["model.decoder.moe.layer_freq=2"], r"layers \[0, 2\] dense", id="dense-layers"),
    pytest.param(["model.decoder.moe.num_experts=0"], "num_experts is 0", id="dense-decoder"),
    pytest.param(["model.decoder.moe.capacity_factor=1.25"], "capacity_factor", id="capacity"),
])
def test_configs_mixtral_cannot_express_are_refused(configs_dir, overrides, message):
    good = _config(configs_dir)
    hf = _random_mixtral(good).state_dict()
    config = _config(configs_dir, *overrides)
    for convert in (mixtral_config, lambda c: megatron_from_mixtral(hf, c),
                    lambda c: mixtral_from_megatron(megatron_from_mixtral(hf, good), c)):
        with pytest.raises(InteropError, match=message):
            convert(config)


def test_triton_moe_decoder_is_deterministic(configs_dir):
    """The same inputs twice through the decoder (kernels.moe=triton, training mode so the
    auxiliary losses reach the router): bit-identical logits and gradients."""
    config = _config(configs_dir, "kernels.moe=triton")
    initialize(config)
    try:
        (model,) = build_model_chunks(config, on_cpu=True)
        model.train()
        generator = torch.Generator().manual_seed(7)
        tokens = torch.randint(0, config.model.decoder.vocab_size, (2, 29), generator=generator)
        positions = torch.arange(29).expand(2, -1)

        def run():
            model.zero_grad(set_to_none=True)
            logits = model(tokens, positions, attention_mask=None)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                     tokens[:, 1:].flatten())
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            return logits.detach().clone(), grads

        logits_a, grads_a = run()
        logits_b, grads_b = run()
        assert torch.equal(logits_a, logits_b)
        assert grads_a.keys() == grads_b.keys()
        assert any("router" in n for n in grads_a) and any("experts.w1" in n for n in grads_a)
        for name in grads_a:
            assert grads_a[name].abs().sum() > 0, f"{name}: no gradient"
            assert torch.equal(grads_a[name], grads_b[name]), name
    finally:
        shutdown()
