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

Tolerance: max |MoE - dense| <= ATOL + RTOL * max |dense|. Exact copies with weights summing
to one differ from the dense FFN only by fp32 round-off (the grouped GEMM and the G-shard sum
add in another order): measured on the tiny 4-layer models below 1e-6 against logits of size
~0.5-2 in every tested layout; a wrong expert layout or a missed scale is off by 1e-2 or more.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import List, Tuple

import torch

from ..config import Config

RTOL, ATOL = 1e-5, 1e-5
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


def compare(dense_chunks: List[torch.nn.Module], moe_chunks: List[torch.nn.Module],
            config: Config, device: torch.device, rtol: float = RTOL,
            atol: float = ATOL) -> Verification:
    """Both models on the same sample batch (seeded by ``config.train.seed``); tolerance
    ``atol + rtol * max |dense logit|``."""
    tokens = sample_tokens(config, config.train.seed)
    vocab = config.model.decoder.vocab_size
    dense = decoder_logits(dense_chunks, tokens, device)[..., :vocab]
    moe = decoder_logits(moe_chunks, tokens, device)[..., :vocab]
    scale = float(dense.abs().max())
    diff = float((moe - dense).abs().max())
    return Verification(diff, scale, atol + rtol * scale, tuple(tokens.shape))
