"""Plain-torch references of every kernel in ``mm1_moe.kernels``: the oracle of the tests and
the baseline of the benchmarks. One module per op, re-exported here."""

from .attention import attention_mask_reference, attention_reference
from .dispatch import combine_ref, dispatch_metadata_ref, dispatch_ref
from .experts import grouped_mm_reference, swiglu_experts_reference
from .rmsnorm import rms_norm_reference
from .router import router_reference

__all__ = ["attention_mask_reference", "attention_reference", "combine_ref", "dispatch_metadata_ref", "dispatch_ref", "grouped_mm_reference",
           "rms_norm_reference", "router_reference", "swiglu_experts_reference"]
