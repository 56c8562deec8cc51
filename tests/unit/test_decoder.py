"""The dense decoder against an outside reference: `transformers` LlamaForCausalLM with random
weights, converted by our interop functions. Also the parameter count of the real module tree
against `mm1_moe.info`'s formula."""

import os

import pytest
import torch

from mm1_moe.config import load_config
from mm1_moe.info import param_counts
from mm1_moe.interop import InteropError, llama_config, llama_from_megatron, load_llama_, megatron_from_llama
from mm1_moe.models.builder import build_model_chunks
from mm1_moe.runtime import initialize, shutdown

from _reference_models import assert_decoder_logits_match, loads_every_parameter, perturbed  # noqa: E402

transformers = pytest.importorskip("transformers")


def _started(configs_dir, *overrides):
    config = load_config(os.path.join(configs_dir, "tiny-dense.yaml"), list(overrides))
    initialize(config)
    return config


def _random_llama(config, seed=0):
    torch.manual_seed(seed)
    return perturbed(transformers.LlamaForCausalLM(llama_config(config)))


# Each row: what it exercises.
CASES = {
    "gqa_2_groups_padded_vocab": ["model.decoder.vocab_size=250"],
    "mha_odd_seq": ["model.decoder.num_query_groups=null"],
    "one_kv_group_rope_theta": ["model.decoder.num_query_groups=1", "model.decoder.rope_theta=500000.0"],
}


@pytest.mark.parametrize("overrides", CASES.values(), ids=CASES.keys())
def test_logits_match_transformers_llama(configs_dir, overrides):
    config = _started(configs_dir, *overrides)
    try:
        hf = _random_llama(config)
        (ours,) = build_model_chunks(config, on_cpu=True)
        loads_every_parameter(ours, lambda: load_llama_([ours], hf.state_dict(), config))
        # fp32 end to end; measured max error 9e-8 on logits of magnitude ~1e1
        assert_decoder_logits_match(ours, hf, config)
    finally:
        shutdown()


def test_state_dict_round_trip_is_exact(configs_dir):
    config = load_config(os.path.join(configs_dir, "tiny-dense.yaml"), ["model.decoder.vocab_size=250"])
    hf = _random_llama(config).state_dict()
    back = llama_from_megatron(megatron_from_llama(hf, config), config)
    assert back.keys() == {k for k in hf if "rotary" not in k}
    for key, value in back.items():
        assert torch.equal(value, hf[key]), key


def test_missing_extra_and_misshaped_tensors_are_named(configs_dir):
    config = load_config(os.path.join(configs_dir, "tiny-dense.yaml"))
    hf = dict(_random_llama(config).state_dict())
    missing = {k: v for k, v in hf.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(InteropError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        megatron_from_llama(missing, config)
    extra = dict(hf, **{"model.layers.9.mlp.up_proj.weight": torch.zeros(1)})
    with pytest.raises(InteropError, match=r"unexpected.*model\.layers\.9\.mlp\.up_proj"):
        megatron_from_llama(extra, config)
    bad = dict(hf, **{"model.layers.0.self_attn.k_proj.weight": torch.zeros(3, 64)})
    with pytest.raises(InteropError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight: shape \(3, 64\)"):
        megatron_from_llama(bad, config)
    moe = load_config(os.path.join(configs_dir, "tiny-moe.yaml"))
    with pytest.raises(InteropError, match="num_experts must be 0"):
        megatron_from_llama(hf, moe)


def test_module_tree_parameter_count_matches_info_formula(configs_dir):
    config = _started(configs_dir, "model.decoder.vocab_size=250")
    try:
        (model,) = build_model_chunks(config, on_cpu=True)
        counted = sum(p.numel() for p in model.parameters())
        counts = param_counts(config)
        assert counted == counts.decoder_dense + counts.experts + counts.routers
    finally:
        shutdown()
