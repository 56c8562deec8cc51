"""Each parameter's initial distribution, said by the module that owns it: one source for a
plain build and for layout-invariant init (``mm1_moe.models.init``), which draws from it.

* Modules of ours answer ``param_init(name) -> ParamInit`` for their own (direct) parameters and
  draw them from the same records in their constructors (``GroupedSwiGLUExperts``,
  ``TopKRouter``, the connectors, ``VisionEmbeddings``).
* Modules we do not own are read by type (:func:`param_init_of`), from what they keep. Megatron's
  linears keep the ``TransformerConfig`` they were built with, not the init method they were
  handed: its transformer hands every ``ColumnParallelLinear`` (linear_qkv, linear_fc1, the
  output layer) ``config.init_method`` and every ``RowParallelLinear`` (linear_proj,
  linear_fc2: the output projections of residual branches) ``config.output_layer_init_method``,
  N(0, std / sqrt(2 L)); biases start at zero. Its embedding gets ``embedding_init_method`` of
  the nearest enclosing module's config. Torch's layers get what their ``reset_parameters``
  draws.

``tests/unit/test_init_source.py`` checks every parameter of the tiny builds against a plain
build, which is what catches a type rule that no longer says what the module does.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Literal, Optional, Tuple

import torch

Kind = Literal["normal", "uniform", "ones", "zeros"]


@dataclass(frozen=True)
class ParamInit:
    """An initial distribution: N(0, scale), U(-scale, scale), all ones or all zeros."""

    kind: Kind
    scale: float = 0.0
    """normal: the standard deviation; uniform: the bound; unused for ones and zeros."""

    def __post_init__(self):
        if self.kind not in ("normal", "uniform", "ones", "zeros"):
            raise ValueError(f"ParamInit.kind ({self.kind!r}) must be normal, uniform, ones or zeros")
        if self.kind in ("normal", "uniform") and not self.scale > 0:
            raise ValueError(f"ParamInit({self.kind}): scale ({self.scale}) must be positive")

    @torch.no_grad()
    def init_(self, tensor: torch.Tensor,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Fill ``tensor`` in place (the same draws as ``torch.nn.init.normal_`` / ``uniform_``
        with this generator) and return it."""
        if self.kind == "normal":
            return tensor.normal_(0.0, self.scale, generator=generator)
        if self.kind == "uniform":
            return tensor.uniform_(-self.scale, self.scale, generator=generator)
        return tensor.fill_(1.0 if self.kind == "ones" else 0.0)


def normal(std: float) -> ParamInit:
    return ParamInit("normal", float(std))


def uniform(bound: float) -> ParamInit:
    return ParamInit("uniform", float(bound))


ONES, ZEROS = ParamInit("ones"), ParamInit("zeros")


def from_init_method(init_method: Callable) -> ParamInit:
    """The ParamInit of a Megatron init method: ``init_method_normal`` and
    ``scaled_init_method_normal`` (megatron.core.utils) are
    ``functools.partial(torch.nn.init.normal_, mean=0.0, std=...)``."""
    if (isinstance(init_method, functools.partial) and init_method.func is torch.nn.init.normal_
            and not init_method.args and init_method.keywords.get("mean", 0.0) == 0.0
            and "std" in init_method.keywords):
        return normal(init_method.keywords["std"])
    raise TypeError(f"init method {init_method!r}: only N(0, std) init methods "
                    "(megatron.core.utils.init_method_normal) can be described as a ParamInit")


def torch_default(module: torch.nn.Module, name: str) -> ParamInit:
    """``nn.Linear`` / ``nn.Conv*``'s ``reset_parameters``: kaiming_uniform_(a=sqrt(5)) on the
    weight, which is U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the same bound for the bias."""
    fan_in = math.prod(module.weight.shape[1:])
    return uniform(1.0 / math.sqrt(fan_in))


def _norm(module: torch.nn.Module, name: str) -> ParamInit:
    return ONES if name == "weight" else ZEROS


def _megatron_linear(init_method_field: str):
    def rule(module: torch.nn.Module, name: str) -> ParamInit:
        if name == "bias":
            return ZEROS
        return from_init_method(getattr(module.config, init_method_field))
    return rule


@functools.lru_cache(maxsize=None)
def _type_rules() -> Tuple[Tuple[type, Callable[[torch.nn.Module, str], ParamInit]], ...]:
    """(type, rule(module, parameter name)), the first isinstance match wins."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    nn = torch.nn
    return (
        (ColumnParallelLinear, _megatron_linear("init_method")),
        (RowParallelLinear, _megatron_linear("output_layer_init_method")),
        ((nn.LayerNorm, nn.RMSNorm, nn.GroupNorm), _norm),
        ((nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d), torch_default),
        (nn.Embedding, lambda module, name: normal(1.0)),
    )


def param_init_of(module: torch.nn.Module, name: str, config=None) -> ParamInit:
    """How ``module`` initialises its own parameter ``name``: its ``param_init`` when it has
    one, else the rule for its type. ``config``: the ``TransformerConfig`` of the nearest
    enclosing Megatron module (a ``VocabParallelEmbedding`` keeps none of its own)."""
    own = getattr(module, "param_init", None)
    if callable(own):
        return own(name)
    from megatron.core.tensor_parallel.layers import VocabParallelEmbedding

    if isinstance(module, VocabParallelEmbedding) and config is not None:
        return from_init_method(config.embedding_init_method)
    for types, rule in _type_rules():
        if isinstance(module, types):
            return rule(module, name)
    raise TypeError(f"no init rule for parameter {name!r} of {type(module).__name__}: give the "
                    "module a param_init(name) method (mm1_moe/models/param_init.py)")


def named_param_inits(module: torch.nn.Module, prefix: str = "",
                      config=None) -> Iterator[Tuple[str, torch.nn.Parameter, ParamInit]]:
    """(qualified name, parameter, ParamInit) for every parameter under ``module``."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    if isinstance(getattr(module, "config", None), TransformerConfig):
        config = module.config
    for name, param in module.named_parameters(recurse=False):
        yield prefix + name, param, param_init_of(module, name, config)
    for child_name, child in module.named_children():
        yield from named_param_inits(child, f"{prefix}{child_name}.", config)


def param_inits_by_id(modules) -> Dict[int, ParamInit]:
    """id(parameter) -> ParamInit over ``modules`` (what layout-invariant init looks up)."""
    return {id(p): spec for module in modules for _, p, spec in named_param_inits(module)}
