"""Compile Triton kernels for a GPU target without a GPU, to catch what the interpreter accepts
but the GPU compiler rejects (dot K < 16, non-jit calls, loop-carried type changes,
shared-memory overflow). About a second per kernel and target on a laptop CPU.

Under ``TRITON_INTERPRET=1`` (CPU tests) ``tl.max``, ``tl.sum``, ``tl.cumsum`` and friends are
interpreter objects the GPU compiler cannot lower, so the compile runs in a child process with
the interpreter off and a private, empty cache (a warm ``~/.triton/cache`` would hide failures).
Requests are batched: one child pays the imports once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Mapping

from ._common import INTERPRET, SHARED_MEMORY_LIMIT


@dataclass(frozen=True)
class CompileRequest:
    """One kernel at one launch configuration. ``signature`` maps every argument name to a Triton
    type (``"*bf16"``, ``"i32"``, ``"fp32"``, ``"constexpr"`` for the names in ``constexprs``)."""

    module: str
    kernel: str
    signature: Dict[str, str]
    constexprs: Dict[str, object] = field(default_factory=dict)
    capability: int = 90
    num_warps: int = 4
    num_stages: int = 3
    aligned: bool = True
    """Mark every pointer 16-byte aligned, as a real launch of torch-allocated tensors does:
    without the hint Triton barely multi-buffers and under-reports shared memory ~3x."""


def _compile_here(req: CompileRequest) -> int:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    kernel = getattr(importlib.import_module(req.module), req.kernel)
    fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    attrs = {}
    if req.aligned:
        attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
                 for name, kind in req.signature.items() if kind.startswith("*")}
    source = ASTSource(fn, signature=dict(req.signature), constexprs=dict(req.constexprs),
                       attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", req.capability, 32),
                              options={"num_warps": req.num_warps, "num_stages": req.num_stages})
    return int(compiled.metadata.shared)


def _compile_in_child(requests: List[CompileRequest]) -> List[object]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_INTERPRET"] = "0"  # explicit: mm1_moe.kernels turns it on when CPU-only
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache
        payload = json.dumps([asdict(r) for r in requests])
        proc = subprocess.run([sys.executable, "-m", __name__], input=payload, env=env,
                              capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"compile child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compile_many(requests: List[CompileRequest]) -> List[int]:
    """Shared memory (bytes per block) of each request. Raises naming the kernel on a compile
    error or when its shared memory exceeds the card's limit."""
    results = ([_try(r) for r in requests] if not INTERPRET else _compile_in_child(requests))
    shared = []
    for req, res in zip(requests, results):
        if isinstance(res, str):
            raise RuntimeError(f"{req.module}.{req.kernel} on sm_{req.capability}: {res}")
        limit = SHARED_MEMORY_LIMIT[req.capability]
        if res > limit:
            raise RuntimeError(f"{req.module}.{req.kernel}: {res} bytes of shared memory on "
                               f"sm_{req.capability}, over the {limit}-byte limit")
        shared.append(res)
    return shared


def _try(req: CompileRequest) -> object:
    try:
        return _compile_here(req)
    except Exception as err:  # reported per request, with the kernel's name
        return f"{type(err).__name__}: {err}"


def compile_for_target(kernel, signature: Mapping[str, str], constexprs: Mapping[str, object],
                       capability: int = 90, num_warps: int = 4, num_stages: int = 3) -> int:
    """Compile one ``@triton.jit`` kernel (module-level, importable) for ``sm_<capability>``;
    return its shared memory per block in bytes."""
    fn = getattr(kernel, "fn", kernel)
    req = CompileRequest(fn.__module__, fn.__name__, dict(signature), dict(constexprs),
                         capability, num_warps, num_stages)
    return compile_many([req])[0]


if __name__ == "__main__":  # the child: requests on stdin, one JSON list on the last line
    reqs = [CompileRequest(**r) for r in json.loads(sys.stdin.read())]
    print(json.dumps([_try(r) for r in reqs]))
