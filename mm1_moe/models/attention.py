"""Core attention submodules for Megatron-core layer specs (the decoder's and the ViT's): our
Triton flash attention, torch SDPA, and flash-attn. The config switch ``kernels.attention``
picks one (``decoder.CORE_ATTENTION``); all three have Megatron ``DotProductAttention``'s
constructor and forward signatures, so a spec swaps them without other changes.

Shape legend: S sequence, B batch, T packed tokens (thd format), Hq / Hkv query / key-value
heads local to this tensor-parallel rank (Megatron has already split them), Dh head dim.

Layouts Megatron passes: q [S, B, Hq, Dh], k / v [S, B, Hkv, Dh] -> output [S, B, Hq * Dh];
with ``packed_seq_params.qkv_format == "thd"``: q [T, Hq, Dh] -> output [T, Hq * Dh]. Packed
documents (``packed_seq_params.cu_seqlens_q``, or ``cu_seqlens_q_padded`` when set, as
Megatron's RoPE reads them) never attend across their boundaries.

Masks: ``attn_mask_type`` causal (and causal_bottom_right, the same for self-attention) or
no_mask (the ViT). As in Transformer Engine's attention for these types, an ``attention_mask``
tensor is not read: causal structure comes from the mask type and documents from
``packed_seq_params``. Padding and arbitrary masks, attention dropout, attention bias, sliding
windows, non-vanilla softmax and context parallelism are refused at construction or call time.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from ..config import ConfigError

_CAUSAL = (AttnMaskType.causal, AttnMaskType.causal_bottom_right)
_BIDIRECTIONAL = (AttnMaskType.no_mask,)


class _CoreAttention(MegatronModule):
    """DotProductAttention's constructor contract; subclasses implement ``_attend``."""

    backend = ""

    def __init__(self, config: TransformerConfig, layer_number: int,
                 attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config=config)
        self.config = config
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self._refuse(dropout != 0.0, f"attention_dropout={dropout} (attention dropout)")
        self._refuse(config.context_parallel_size != 1,
                     f"context_parallel_size={config.context_parallel_size}")
        self._refuse(config.softmax_type != "vanilla", f"softmax_type={config.softmax_type!r}")
        self._refuse(config.window_size is not None, f"window_size={config.window_size}")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp = pg_collection.tp.size()
        self.num_heads = divide(config.num_attention_heads, tp)
        self.num_kv_heads = divide(config.num_query_groups, tp)
        self.head_dim = config.kv_channels
        # DotProductAttention divides its scale by layer_number under
        # apply_query_key_layer_scaling and its softmax multiplies it back: the net is this.
        self.softmax_scale = (softmax_scale if softmax_scale is not None
                              else 1.0 / math.sqrt(self.head_dim))

    def _refuse(self, condition: bool, what: str) -> None:
        if condition:
            raise ConfigError(f"kernels.attention ({self.backend}): {what} is not supported; "
                              "use kernels.attention=local")

    def _causal(self, attn_mask_type: Optional[AttnMaskType]) -> bool:
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if mask_type in _CAUSAL:
            return True
        if mask_type in _BIDIRECTIONAL:
            return False
        raise NotImplementedError(
            f"kernels.attention ({self.backend}): attn_mask_type {mask_type} is not supported "
            "(causal or no_mask; pass packed documents as packed_seq_params)")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor],
                attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> torch.Tensor:
        """q [S, B, Hq, Dh] (or [T, Hq, Dh] packed) -> [S, B, Hq * Dh] (or [T, Hq * Dh])."""
        if attention_bias is not None:
            raise NotImplementedError(f"kernels.attention ({self.backend}): attention_bias")
        causal = self._causal(attn_mask_type)
        thd = query.dim() == 3
        if thd:  # [T, H, Dh]: one packed row
            q, k, v = query[None], key[None], value[None]
        else:  # [S, B, H, Dh] -> [B, S, H, Dh] views, no copies
            q, k, v = (t.permute(1, 0, 2, 3) for t in (query, key, value))
        cu_seqlens = _cu_seqlens(packed_seq_params)
        if cu_seqlens is not None and q.shape[0] != 1:
            raise NotImplementedError(
                f"kernels.attention ({self.backend}): packed_seq_params with batch {q.shape[0]}; "
                "packed sequences come as one row (thd, or sbhd with B = 1)")
        o_BSHD = self._attend(q, k, v, causal, cu_seqlens, packed_seq_params)
        if thd:
            return o_BSHD[0].reshape(o_BSHD.shape[1], -1)
        return o_BSHD.permute(1, 0, 2, 3).reshape(o_BSHD.shape[1], o_BSHD.shape[0], -1)

    def _attend(self, q_BSHD, k_BSHD, v_BSHD, causal: bool, cu_seqlens: Optional[torch.Tensor],
                packed_seq_params: Optional[PackedSeqParams]) -> torch.Tensor:
        raise NotImplementedError


def _cu_seqlens(packed_seq_params: Optional[PackedSeqParams]) -> Optional[torch.Tensor]:
    if packed_seq_params is None:
        return None
    if packed_seq_params.cu_seqlens_q_padded is not None:
        return packed_seq_params.cu_seqlens_q_padded
    return packed_seq_params.cu_seqlens_q


class TritonAttention(_CoreAttention):
    """Our Triton flash attention (``mm1_moe.kernels.attention``): causal, bidirectional or
    document-masked, GQA without expanding k/v, bf16 on GPU (the interpreter on CPU)."""

    backend = "triton"

    def _attend(self, q_BSHD, k_BSHD, v_BSHD, causal, cu_seqlens, packed_seq_params):
        # Imported on first use, after the runtime has chosen the device (and, on CPU, the
        # Triton interpreter, which must be set before kernel modules are imported).
        from mm1_moe.kernels.attention import doc_ids_from_cu_seqlens, flash_attention

        doc_ids_BS = None
        if cu_seqlens is not None:
            doc_ids_BS = doc_ids_from_cu_seqlens(cu_seqlens, q_BSHD.shape[1])[None]
        return flash_attention(q_BSHD, k_BSHD, v_BSHD, causal, self.softmax_scale, doc_ids_BS)


class SDPAAttention(_CoreAttention):
    """torch ``scaled_dot_product_attention`` (its flash / memory-efficient backends on GPU);
    packed documents by an explicit block-diagonal boolean mask [1, 1, S, S]."""

    backend = "sdpa"

    def _attend(self, q_BSHD, k_BSHD, v_BSHD, causal, cu_seqlens, packed_seq_params):
        q, k, v = (t.transpose(1, 2) for t in (q_BSHD, k_BSHD, v_BSHD))  # [B, H, S, Dh]
        gqa = q.shape[1] != k.shape[1]
        if cu_seqlens is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                               scale=self.softmax_scale, enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=_doc_mask(cu_seqlens, q.shape[2],
                                                                            causal),
                                               scale=self.softmax_scale, enable_gqa=gqa)
        return o.transpose(1, 2)


def _doc_mask(cu_seqlens: torch.Tensor, S: int, causal: bool) -> torch.Tensor:
    """[1, 1, S, S] bool, True = attend: same segment of cu_seqlens (and j <= i if causal)."""
    tokens = torch.arange(S, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    doc = torch.searchsorted(cu_seqlens[1:].contiguous(), tokens, right=True)
    mask = doc[:, None] == doc[None, :]
    if causal:
        mask = mask & torch.ones(S, S, dtype=torch.bool, device=mask.device).tril()
    return mask[None, None]


class FlashAttnAttention(_CoreAttention):
    """flash-attn (``flash_attn_func`` / ``flash_attn_varlen_func``) when installed (GPU only)."""

    backend = "flash_attn"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        try:
            import flash_attn  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                "kernels.attention (flash_attn): the flash-attn package is not installed (it is "
                "GPU-only: pip install 'mm1-moe[gpu]'); use kernels.attention=triton or sdpa"
            ) from exc

    def _attend(self, q_BSHD, k_BSHD, v_BSHD, causal, cu_seqlens, packed_seq_params):
        from flash_attn import flash_attn_func, flash_attn_varlen_func

        if cu_seqlens is None:
            return flash_attn_func(q_BSHD, k_BSHD, v_BSHD, 0.0, softmax_scale=self.softmax_scale,
                                   causal=causal)
        cu = cu_seqlens.to(torch.int32)
        max_len = packed_seq_params.max_seqlen_q
        if max_len is None:
            max_len = int((cu[1:] - cu[:-1]).max())  # a host sync; Megatron usually sets it
        o_THD = flash_attn_varlen_func(q_BSHD[0], k_BSHD[0], v_BSHD[0], cu, cu, max_len, max_len,
                                       0.0, softmax_scale=self.softmax_scale, causal=causal)
        return o_THD[None]

