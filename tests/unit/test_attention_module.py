"""The core-attention submodules (``mm1_moe.models.attention``) against Megatron-core's own
``DotProductAttention`` (an oracle we did not write): same outputs and gradients from the same
TransformerConfig, and the same decoder logits with ours swapped into the layer spec."""

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from mm1_moe.config import ConfigError
from mm1_moe.config.megatron import decoder_transformer_config
from mm1_moe.models import decoder
from mm1_moe.models.attention import FlashAttnAttention, SDPAAttention, TritonAttention


def _qkv(S, B, config, seed=0):
    """Megatron's layout: q [S, B, Hq, Dh], k / v [S, B, Hkv, Dh] (tiny-dense: 4 heads, 2
    groups, Dh 16)."""
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, dh = config.num_attention_heads, config.num_query_groups, config.kv_channels
    shapes = [(S, B, hq, dh), (S, B, hkv, dh), (S, B, hkv, dh)]
    return [torch.randn(s, generator=gen).requires_grad_() for s in shapes]


def _out_and_grads(module, q, k, v, **kwargs):
    out = module(q, k, v, None, **kwargs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return (out,) + torch.autograd.grad(out, (q, k, v), grad)


@pytest.fixture
def transformer_config(runtime):
    _, config = runtime
    return decoder_transformer_config(config, use_cpu_initialization=True)


@pytest.mark.parametrize("mask", [AttnMaskType.causal, AttnMaskType.no_mask],
                         ids=["causal_decoder", "no_mask_vit"])
@pytest.mark.parametrize("cls", [TritonAttention, SDPAAttention], ids=["triton", "sdpa"])
def test_matches_megatron_dot_product_attention(transformer_config, cls, mask):
    args = (transformer_config, 1, mask, "self")
    q, k, v = _qkv(37, 2, transformer_config)
    want = _out_and_grads(DotProductAttention(*args), q, k, v)
    got = _out_and_grads(cls(*args), q, k, v)
    assert got[0].shape == (37, 2, 64)
    # fp32 on both sides; measured max error 1.3e-6 on outputs and gradients up to ~3
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_softmax_scale_and_layer_scaling_match_megatron(transformer_config):
    transformer_config.apply_query_key_layer_scaling = True
    transformer_config.attention_softmax_in_fp32 = True
    args = (transformer_config, 3, AttnMaskType.causal, "self")
    q, k, v = _qkv(20, 1, transformer_config)
    want = DotProductAttention(*args, softmax_scale=0.11)(q, k, v, None)
    got = TritonAttention(*args, softmax_scale=0.11)(q, k, v, None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_packed_documents_thd(transformer_config):
    """thd packing (q [T, Hq, Dh]): ours and SDPA against per-document attention run one
    document at a time through Megatron's DotProductAttention."""
    lengths = [1, 12, 30, 1, 6]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=30, max_seqlen_kv=30)
    args = (transformer_config, 1, AttnMaskType.causal, "self")
    q, k, v = (t[:, 0].detach() for t in _qkv(sum(lengths), 1, transformer_config))
    local = DotProductAttention(*args)
    want = torch.cat([local(q[a:b, None], k[a:b, None], v[a:b, None], None)[:, 0]
                      for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    for cls in (TritonAttention, SDPAAttention):
        got = cls(*args)(q, k, v, None, packed_seq_params=packed)
        assert got.shape == (sum(lengths), 64)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=cls.__name__)


def test_unsupported_settings_are_refused(transformer_config):
    args = (transformer_config, 1, AttnMaskType.causal, "self")
    with pytest.raises(ConfigError, match=r"kernels.attention \(triton\): attention_dropout"):
        TritonAttention(*args, attention_dropout=0.1)
    q, k, v = _qkv(8, 1, transformer_config)
    with pytest.raises(NotImplementedError, match="padding"):
        TritonAttention(*args)(q, k, v, None, attn_mask_type=AttnMaskType.padding)
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"kernels.attention \(flash_attn\).*not installed"):
            FlashAttnAttention(*args)


def test_decoder_logits_and_grads_match_with_triton_attention(runtime, monkeypatch):
    """The tiny decoder (4 layers, GQA 4:2) built twice from one spec, Megatron's
    DotProductAttention then ours as core_attention, same weights: same logits and gradients."""
    _, config = runtime
    tc = decoder_transformer_config(config, use_cpu_initialization=True)
    torch.manual_seed(0)
    config.kernels.attention = "local"
    local = decoder.build_decoder(config, tc)
    config.kernels.attention = "triton"
    ours = decoder.build_decoder(config, tc)
    assert type(ours.decoder.layers[0].self_attention.core_attention) is TritonAttention
    ours.load_state_dict(local.state_dict())
    tokens = torch.randint(0, config.model.decoder.vocab_size, (2, 45))
    positions = torch.arange(45).expand(2, -1)
    results = []
    for model in (local, ours):
        logits = model(tokens, positions, attention_mask=None)
        logits.float().square().mean().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (want, want_grads), (got, got_grads) = results
    # fp32 end to end; measured max errors 2e-7 on logits of magnitude ~1, 1e-9 on gradients
    # of magnitude ~2e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-7, rtol=1e-4, msg=name)
