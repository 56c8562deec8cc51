"""One init source: a layout-invariant build starts from the distributions a plain build gives.

Each parameter-owning module says how its parameters start (``mm1_moe/models/param_init.py``)
and layout-invariant init draws from that. The oracle is a plain build (seeded, no invariant
init): Megatron's, torch's and our constructors' own draws. Every parameter of the tiny builds is
checked on the tensors themselves, plain against its ParamInit (a type rule that misdescribes a
Megatron or torch module fails here) and invariant against plain. The bug this guards: experts'
w2 drawn N(0, 0.02) by the invariant init, 2.8x the N(0, 0.02 / sqrt(2 x 4 layers)) of a plain
build.

Tolerances. The RMS of n draws from N(0, s) has a relative standard error of 1/sqrt(2n)
(0.45/sqrt(n) for a uniform, so the normal's bound covers both); we allow 5 standard errors on
the log of the ratio (a false failure about once in 3.5 million parameters; the builds are
seeded, so a pass repeats), and sqrt(2) times that between two independent samples. The
smallest tensors (32 elements) still tell apart scales a factor 2.4 apart; experts' w2 (131,072)
one 2% apart. A uniform's draws are also checked against its bound from both sides: all within
it, and the largest above the bound times 1e-6 ** (1 / n) (below it with probability 1e-6).
"""

import math
import os

import pytest
import torch

from mm1_moe.config import load_config
from mm1_moe.models.builder import build_model_chunks
from mm1_moe.models.param_init import ParamInit, from_init_method, named_param_inits, param_init_of
from mm1_moe.runtime import initialize, shutdown

Z = 5.0  # standard errors allowed

# Each row: config, overrides, what it exercises.
CASES = {
    # ViT (Megatron layers with biases, torch embeddings), C-Abstractor, router, experts
    "mm1_moe": ("tiny-mm1-moe.yaml", []),
    # text-only GPTModel: embedding, dense SwiGLU fc1 (a ShardedTensorFactory), output layer
    "dense_text_only": ("tiny-dense.yaml", []),
    # MM1 with attention pooling: learned queries, biased torch linears, a torch LayerNorm
    "dense_attn_pool": ("tiny-dense.yaml", ["model.image_token_id=255",
                                            "model.connector.type=attn_pool"]),
}


def _build(configs_dir, name, overrides, invariant):
    config = load_config(os.path.join(configs_dir, name),
                         [*overrides, f"model.layout_invariant_init={str(invariant).lower()}"])
    initialize(config)  # seeds torch and Megatron's RNG from train.seed
    try:
        (chunk,) = build_model_chunks(config, on_cpu=True)
    finally:
        shutdown()
    return chunk


def _rms(t: torch.Tensor) -> float:
    return float(t.double().square().mean().sqrt())


def _check_draw(name: str, which: str, t: torch.Tensor, spec: ParamInit) -> None:
    n = t.numel()
    if spec.kind in ("ones", "zeros"):
        assert torch.equal(t, torch.full_like(t, 1.0 if spec.kind == "ones" else 0.0)), \
            f"{name} ({which}): not all {spec.kind}"
        return
    expected = spec.scale if spec.kind == "normal" else spec.scale / math.sqrt(3)
    log_ratio = math.log(_rms(t) / expected) if _rms(t) > 0 else -math.inf
    assert abs(log_ratio) < Z / math.sqrt(2 * n), \
        f"{name} ({which}): RMS {_rms(t):.4g}, {spec} expects {expected:.4g} (n={n})"
    if spec.kind == "uniform":
        top = float(t.abs().max())
        assert spec.scale * 1e-6 ** (1 / n) <= top <= spec.scale, \
            f"{name} ({which}): max |x| {top:.4g} for U(-{spec.scale:.4g}, {spec.scale:.4g})"


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_invariant_init_matches_a_plain_build_for_every_parameter(configs_dir, case):
    config_name, overrides = case
    plain = _build(configs_dir, config_name, overrides, invariant=False)
    invariant = _build(configs_dir, config_name, overrides, invariant=True)
    specs = {name: spec for name, _, spec in named_param_inits(plain)}
    inv_params = dict(invariant.named_parameters())
    assert specs.keys() == inv_params.keys()
    for name, p in plain.named_parameters():
        a, b, spec = p.detach(), inv_params[name].detach(), specs[name]
        _check_draw(name, "plain", a, spec)
        _check_draw(name, "invariant", b, spec)
        if spec.kind in ("normal", "uniform"):
            log_ratio = math.log(_rms(b) / _rms(a))
            assert abs(log_ratio) < Z / math.sqrt(a.numel()), \
                f"{name}: RMS {_rms(b):.4g} invariant vs {_rms(a):.4g} plain"
            assert not torch.equal(a, b), f"{name}: the invariant init left the plain draw"


def test_experts_w2_gets_the_scaled_init(configs_dir):
    """The issue's case by name: N(0, std / sqrt(2 L)) for w2, N(0, std) for w1."""
    model = _build(configs_dir, "tiny-mm1-moe.yaml", [], invariant=True)
    specs = {name: spec for name, _, spec in named_param_inits(model)}
    experts = "language_model.decoder.layers.1.mlp.experts."
    assert specs[experts + "w1"] == ParamInit("normal", 0.02)
    assert specs[experts + "w2"] == ParamInit("normal", 0.02 / math.sqrt(2 * 4))


def test_a_parameter_no_rule_describes_is_an_error():
    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = torch.nn.Parameter(torch.ones(3))

    with pytest.raises(TypeError, match="no init rule for parameter 'gain' of Scale"):
        param_init_of(Scale(), "gain")


def test_only_normal_init_methods_are_read():
    import functools

    assert from_init_method(functools.partial(torch.nn.init.normal_, mean=0.0, std=0.1)) == \
        ParamInit("normal", 0.1)
    with pytest.raises(TypeError, match="only N\\(0, std\\) init methods"):
        from_init_method(torch.nn.init.xavier_uniform_)
