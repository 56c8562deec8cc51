"""Layout-invariant initialisation: the same weights under any TP/PP/DP layout.

Megatron draws each rank's initial weights from that rank's RNG stream, so a TP=2 or PP=2 run
starts from different weights than a single-process run and their losses cannot be compared.
Here every parameter is drawn from a generator seeded by its *global* name, taken from Megatron's
own ``sharded_state_dict`` (the same key, global shape and offset that distributed checkpoints
use), and each rank copies out only its shard. The cost is one full-size tensor per parameter
on every rank, which is why it is opt-in (``model.layout_invariant_init``): tests, parity
checks, small models.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable, Iterable, Iterator, Optional, Tuple

import torch

from ..config import Config


def model_sharded_state_dict(module: torch.nn.Module) -> dict:
    """Megatron's sharded state dict of a model chunk. Decoders that mix dense and MoE layers
    get per-layer keys (``decoder.layers.3.mlp.experts.w1``): stacking them on one layer axis
    would leave holes (dense fc1 only on some layers), which dist_checkpointing rejects."""
    config = getattr(module, "config", None)
    mixed = getattr(config, "num_moe_experts", None) is not None
    return module.sharded_state_dict(metadata={"non_homogeneous_layers": True} if mixed else None)


def _sharded_tensors(module: torch.nn.Module) -> Iterator:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    for item in nested_values(model_sharded_state_dict(module)):
        if isinstance(item, ShardedTensorFactory):  # e.g. SwiGLU fc1: [gate; up] halves
            yield from (t for t in nested_values(item.build()) if isinstance(t, ShardedTensor))
        elif isinstance(item, ShardedTensor):
            yield item


def _std_for(key: str, config: Config) -> float:
    """Megatron's scheme: N(0, std); output projections of each residual branch get
    std / sqrt(2 * num_layers) (GPT-2's scaled init, ``scaled_init_method_normal``)."""
    dec = config.model.decoder
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        depth = config.model.vision.depth if key.startswith("vision_model.") else dec.num_layers
        return dec.init_std / math.sqrt(2.0 * depth)
    return dec.init_std


def _torch_default_bound(key: str, shape) -> Optional[float]:
    """The connector is plain torch (timm-style convs and linears): its weights get torch's own
    default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as a non-invariant build leaves them. N(0, 0.02)
    there shrinks the image tokens (a 3x3 depthwise conv has fan-in 9, a 64-wide readout 64) and
    the tiny MM1 is slower to use them: on the bundled captions at lr 1e-3, the loss with images
    shuffled across captions is 0.30 above the true pairing after 240 steps, 0.63 with torch's
    default. Position embeddings and queries keep N(0, 0.02), as the constructors draw them.
    None: not such a weight."""
    if not key.startswith("connector.") or len(shape) < 2 or key.endswith(("pos_embed", "queries")):
        return None
    fan_in = math.prod(shape[1:])
    return 1.0 / math.sqrt(fan_in)


def _full_tensor(key: str, shape, seed: int, config: Config) -> torch.Tensor:
    if key.endswith("bias"):
        return torch.zeros(shape)
    parts = key.rsplit(".", 2)
    if (len(parts) > 1 and "norm" in parts[-2]) or key.endswith("layer_norm_weight"):
        return torch.ones(shape)
    generator = torch.Generator().manual_seed(seed)
    bound = _torch_default_bound(key, shape)
    if bound is not None:
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)
    return torch.empty(shape).normal_(0.0, _std_for(key, config), generator=generator)


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
def fill_from_global_(modules: Iterable[torch.nn.Module], full_tensor: FullTensorFn) -> int:
    """Set every parameter of ``modules`` (this rank's chunks) to its shard of the global tensor
    that ``full_tensor(global_name, global_shape)`` returns. Works for any TP/PP layout, since
    the shard offsets come from Megatron's own sharded_state_dict. Returns the tensors set."""
    count = 0
    for module in modules:
        for sharded in _sharded_tensors(module):
            n = sharded.prepend_axis_num
            name, shape = layer_key(sharded), tuple(sharded.global_shape[n:])
            full = full_tensor(name, shape)
            if tuple(full.shape) != shape:
                raise ValueError(f"{name}: source tensor has shape {tuple(full.shape)}, the model "
                                 f"expects {shape}")
            index = tuple(slice(o, o + size)
                          for o, size in zip(sharded.global_offset[n:], sharded.local_shape))
            sharded.data.copy_(full[index])
            count += 1
    return count


def layout_invariant_init_(modules: Iterable[torch.nn.Module], config: Config) -> int:
    """Overwrite every parameter of ``modules`` (this rank's model chunks, before wrapping in
    DDP) with its shard of a draw seeded by the parameter's global name. Returns the count."""

    def draw(name: str, shape: Tuple[int, ...]) -> torch.Tensor:
        seed = (config.train.seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63
        return _full_tensor(name, shape, seed, config)

    return fill_from_global_(modules, draw)
