"""The MoE FFN: top-k router, token dispatchers (local gather, local copy, expert-parallel
all-to-all), grouped SwiGLU experts, and the layer that chains them as a Megatron-core MLP
submodule."""

from .backend import MoEOps, moe_ops
from .dispatcher import AllToAllDispatcher, DispatchState, GatherDispatcher, LocalDispatcher
from .experts import GroupedSwiGLUExperts
from .layer import AuxLossInjector, MoELayer, MoEMetrics
from .router import TopKRouter

__all__ = ["AllToAllDispatcher", "AuxLossInjector", "DispatchState", "GatherDispatcher",
           "GroupedSwiGLUExperts", "LocalDispatcher", "MoELayer", "MoEMetrics", "MoEOps",
           "TopKRouter", "moe_ops"]
