"""Shared by the tests that check our modules against `transformers` models with random weights."""

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter drawn from N(0, 0.1), in eval mode: HF's init leaves norms at 1 and biases
    at 0, and a weight left at such a constant would pass a conversion test whatever its place."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.eval()


def loads_every_parameter(module: torch.nn.Module, load: Callable[[], T]) -> T:
    """Fill ``module``'s parameters with NaN, run ``load()``, and fail on any parameter it left
    untouched (nothing may stay at a random init). Returns what ``load`` returned."""
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(float("nan"))
    result = load()
    for name, p in module.named_parameters():
        assert not torch.isnan(p).any(), f"{name} was not loaded"
    return result


def assert_decoder_logits_match(ours: torch.nn.Module, hf: torch.nn.Module, config,
                                seq: int = 37) -> None:
    """Our decoder and the HF causal LM give the same logits on random tokens (fp32 end to end;
    measured max error ~1e-7; padded vocab rows are ours alone)."""
    ours.eval()
    vocab = config.model.decoder.vocab_size
    tokens = torch.randint(0, vocab, (2, seq))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens, torch.arange(seq).expand(2, -1), attention_mask=None)
    assert got.shape[-1] == config.model.decoder.padded_vocab_size
    torch.testing.assert_close(got[..., :vocab], expected, rtol=1e-5, atol=1e-5)
