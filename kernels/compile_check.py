"""Compile a Triton kernel for a GPU target without a GPU, to catch what the interpreter
accepts but the GPU compiler rejects (dot K < 16, non-jit calls, loop-carried type changes,
shared-memory overflow). About a second per kernel and target on a laptop CPU."""

from __future__ import annotations

from typing import Dict, Mapping, Optional

from ._common import SHARED_MEMORY_LIMIT


def compile_for_target(kernel, signature: Mapping[str, str], constexprs: Mapping[str, object],
                       capability: int = 90, num_warps: int = 4, num_stages: int = 3) -> int:
    """Compile ``kernel`` (a ``@triton.jit`` function, also under the interpreter) for
    ``sm_<capability>``; return the shared memory per block in bytes. Raises on a compile error
    or when the shared memory exceeds the card's limit.

    ``signature`` maps every argument name to a Triton type (``"*bf16"``, ``"i32"``, ...,
    ``"constexpr"`` for the names in ``constexprs``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    source = ASTSource(fn, signature=dict(signature), constexprs=dict(constexprs))
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    shared = int(compiled.metadata.shared)
    limit = SHARED_MEMORY_LIMIT[capability]
    if shared > limit:
        raise RuntimeError(f"{fn.__name__}: {shared} bytes of shared memory on sm_{capability}, "
                           f"over the {limit}-byte limit")
    return shared
