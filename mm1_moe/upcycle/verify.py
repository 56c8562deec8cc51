"""Function preservation: the upcycled model's logits against the dense model's, on one seeded
batch of random tokens, both models in fp32 and in eval mode (no router jitter); for a bf16 MoE
config once more with both in bf16 (``BF16_RTOL``).

The dense model is the one loaded from the source's files: a Hugging Face folder through our
strict reader (``interop/hf_files.py``), never ``from_pretrained``, whose random fill of a
missing tensor sits in both models alike and passes this check. It did: max diff 0, "preserved",
while on the tiny Llama of tests/unit/test_hf_strict.py a missing layer-1 up_proj moved the
folder's logits by 0.021 and a missing lm_head by 0.45 (logits up to 0.43; the issue reported
up to 3.2 on its model).

Shapes: B sequences, S tokens, V vocabulary (the real one; padding rows are never compared).

Tolerance: max |MoE - dense| <= ATOL + rtol * max |dense|, rtol = RTOL_PER_SQRT_WIDTH x
sqrt(max(D, F)). Exact copies with weights summing to one differ from the dense FFN only by
fp32 round-off (the grouped GEMM and the G-shard sum add in another order), which grows like
the square root of the dot products' length: measured below 1e-6 against logits of ~0.5-2 on
the tiny 4-layer models (D 64, F 128) in every tested layout, and 9.0e-5 against 2.68 at D 1024,
F 4096 (a fixed 1e-5 relative tolerance failed there). A wrong expert layout or a missed scale
is off by 1e-2 of the logits or more.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import torch

from ..config import Config

ATOL = 1e-5
RTOL_PER_SQRT_WIDTH = 1e-6  # 1.1e-5 at the tiny widths, 6.4e-5 at D 1024 / F 4096
# bf16 upcycling: after the fp32 check, the saved bf16 model against the dense one cast to bf16,
# within 1/32 of the largest logit (8 bf16 ulps there). Measured on the tiny models: 0 for whole
# copies, one ulp (0.0039 against logits up to 0.70) with granularity 2.
BF16_RTOL = 1.0 / 32
BATCH, MAX_TOKENS = 2, 128


@dataclass(frozen=True)
class Verification:
    max_abs_diff: float
    max_abs_logit: float
    tolerance: float
    tokens: Tuple[int, int]  # (B, S) of the sample batch

    @property
    def preserved(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict:
        return dict(asdict(self), preserved=self.preserved)


def sample_tokens(config: Config, seed: int) -> torch.Tensor:
    """[B, S] token ids, uniform over the real vocabulary, from a generator seeded by ``seed``."""
    dec = config.model.decoder
    S = min(config.data.seq_length, dec.max_position_embeddings, MAX_TOKENS)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, dec.vocab_size, (BATCH, S), generator=generator)


@torch.no_grad()
def decoder_logits(chunks: List[torch.nn.Module], tokens_BS: torch.Tensor,
                   device: torch.device) -> torch.Tensor:
    """[B, S, V] fp32 logits of a single-process model (one chunk: TP = PP = 1)."""
    (model,) = chunks
    was_training = model.training
    model.eval()
    try:
        B, S = tokens_BS.shape
        tokens = tokens_BS.to(device)
        positions = torch.arange(S, device=device).expand(B, -1)
        logits = model(tokens, positions, attention_mask=None)
    finally:
        model.train(was_training)
    return logits.float().cpu()


def fp32_rtol(config: Config) -> float:
    """The fp32 check's relative tolerance for this model's widths (module docstring)."""
    dec = config.model.decoder
    return RTOL_PER_SQRT_WIDTH * math.sqrt(max(dec.hidden_size, dec.ffn_hidden_size))


def compare(dense_chunks: List[torch.nn.Module], moe_chunks: List[torch.nn.Module],
            config: Config, device: torch.device, rtol: Optional[float] = None,
            atol: float = ATOL) -> Verification:
    """Both models on the same sample batch (seeded by ``config.train.seed``); tolerance
    ``atol + rtol * max |dense logit|`` (rtol default: ``fp32_rtol``)."""
    rtol = fp32_rtol(config) if rtol is None else rtol
    tokens = sample_tokens(config, config.train.seed)
    vocab = config.model.decoder.vocab_size
    dense = decoder_logits(dense_chunks, tokens, device)[..., :vocab]
    moe = decoder_logits(moe_chunks, tokens, device)[..., :vocab]
    scale = float(dense.abs().max())
    diff = float((moe - dense).abs().max())
    return Verification(diff, scale, atol + rtol * scale, tuple(tokens.shape))
