"""Layout-invariant initialisation: the same weights under any TP/PP/DP layout.

Megatron draws each rank's initial weights from that rank's RNG stream, so a TP=2 or PP=2 run
starts from different weights than a single-process run and their losses cannot be compared.
Here every parameter is drawn from a generator seeded by its *global* name, taken from Megatron's
own ``sharded_state_dict`` (the same key, global shape and offset that distributed checkpoints
use), and each rank copies out only its shard. The distribution is the one the module that owns
the parameter says it draws (``mm1_moe.models.param_init``), so an invariant build starts from
the distributions a plain build gives. The cost is one full-size tensor per parameter on every
rank, which is why it is opt-in (``model.layout_invariant_init``): tests, parity checks, small
models.
"""

from __future__ import annotations

import zlib
from typing import Callable, Iterable, Iterator, Tuple

import torch

from ..config import Config
from .param_init import param_inits_by_id


def model_sharded_state_dict(module: torch.nn.Module) -> dict:
    """Megatron's sharded state dict of a model chunk. Decoders that mix dense and MoE layers
    get per-layer keys (``decoder.layers.3.mlp.experts.w1``): stacking them on one layer axis
    would leave holes (dense fc1 only on some layers), which dist_checkpointing rejects."""
    config = getattr(module, "config", None)
    mixed = getattr(config, "num_moe_experts", None) is not None
    return module.sharded_state_dict(metadata={"non_homogeneous_layers": True} if mixed else None)


def _param_shards(module: torch.nn.Module) -> Iterator[Tuple[torch.Tensor, object]]:
    """(the state-dict tensor, a ShardedTensor over it or over a part of it) for every tensor of
    ``module``'s sharded state dict."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for item in nested_values(model_sharded_state_dict(module)):
        if isinstance(item, ShardedTensorFactory):  # e.g. SwiGLU fc1: [gate; up] halves
            for t in nested_values(item.build()):
                if isinstance(t, ShardedTensor):
                    yield item.data, t
        elif isinstance(item, ShardedTensor):
            yield item.data, item


def _sharded_tensors(module: torch.nn.Module) -> Iterator:
    return (sharded for _, sharded in _param_shards(module))


def layer_key(sharded) -> str:
    """The global, layout-independent name of a sharded tensor: Megatron stacks decoder layers
    on prepended axes (``decoder.layers.mlp.linear_fc2.weight`` at offset (3,)); we spell that
    ``decoder.layers.3.mlp.linear_fc2.weight``, as a single-process state dict does."""
    n = sharded.prepend_axis_num
    if n == 0:
        return sharded.key
    prefix, _, rest = sharded.key.partition("layers.")
    if not rest:
        raise ValueError(f"{sharded.key}: stacked tensor without a 'layers.' component")
    index = ".".join(str(o) for o in sharded.global_offset[:n])
    return f"{prefix}layers.{index}.{rest}"


FullTensorFn = Callable[[str, Tuple[int, ...]], torch.Tensor]


@torch.no_grad()
def _fill(modules: Iterable[torch.nn.Module],
          full_tensor: Callable[[str, Tuple[int, ...], torch.Tensor], torch.Tensor]) -> int:
    count = 0
    for module in modules:
        for param, sharded in _param_shards(module):
            if not isinstance(param, torch.nn.Parameter):
                continue  # a buffer (the router's expert bias): its module sets it
            n = sharded.prepend_axis_num
            name, shape = layer_key(sharded), tuple(sharded.global_shape[n:])
            full = full_tensor(name, shape, param)
            if tuple(full.shape) != shape:
                raise ValueError(f"{name}: source tensor has shape {tuple(full.shape)}, the model "
                                 f"expects {shape}")
            index = tuple(slice(o, o + size)
                          for o, size in zip(sharded.global_offset[n:], sharded.local_shape))
            sharded.data.copy_(full[index])
            count += 1
    return count


def fill_from_global_(modules: Iterable[torch.nn.Module], full_tensor: FullTensorFn) -> int:
    """Set every parameter of ``modules`` (this rank's chunks) to its shard of the global tensor
    that ``full_tensor(global_name, global_shape)`` returns. Works for any TP/PP layout, since
    the shard offsets come from Megatron's own sharded_state_dict. Returns the tensors set."""
    return _fill(modules, lambda name, shape, _param: full_tensor(name, shape))


def layout_invariant_init_(modules: Iterable[torch.nn.Module], config: Config) -> int:
    """Overwrite every parameter of ``modules`` (this rank's model chunks, before wrapping in
    DDP) with its shard of a draw from the parameter's ParamInit, seeded by its global name.
    Returns the count."""
    modules = list(modules)
    inits = param_inits_by_id(modules)

    def draw(name: str, shape: Tuple[int, ...], param: torch.Tensor) -> torch.Tensor:
        if id(param) not in inits:
            raise ValueError(f"{name}: in the sharded state dict but not a parameter of the model")
        seed = (config.train.seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63
        return inits[id(param)].init_(torch.empty(shape), torch.Generator().manual_seed(seed))

    return _fill(modules, draw)
