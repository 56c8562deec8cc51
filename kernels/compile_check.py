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
from typing import Dict, List, Mapping, Optional

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
    aligned_ints: bool = False
    """Also mark the i32 arguments divisible by 16, as a launch specializes such values (the
    attention kernels need it to vectorize their K/V loads into cp.async and pipeline)."""
    divisible: Optional[List[str]] = None
    """The arguments a launch marks 16-divisible, as Triton's binder computed them from the real
    arguments (``kernels/report.py`` captures them); replaces ``aligned``/``aligned_ints``."""
    details: bool = False
    """Return ``report.compiled_details`` (registers, spills, MMA kind, ...) instead of the
    shared memory bytes."""

    @classmethod
    def for_kernel(cls, kernel, types: Mapping[str, str], constexprs: Mapping[str, object],
                   capability: int = 90, **options: int) -> "CompileRequest":
        """A request for a ``@triton.jit`` kernel (also an interpreted one): ``types`` gives
        the runtime arguments' Triton types, every name in ``constexprs`` becomes a constexpr."""
        fn = getattr(kernel, "fn", kernel)
        signature = {name: "constexpr" if name in constexprs else types[name]
                     for name in kernel.arg_names}
        return cls(fn.__module__, fn.__name__, signature, dict(constexprs), capability,
                   **options)


def _encode(value: object) -> object:
    """Constexprs cross to the child as JSON; Triton dtypes (ACC_DTYPE=tl.float32) by name."""
    import triton.language as tl

    return {"tl.dtype": str(value)} if isinstance(value, tl.dtype) else value


def _decode(value: object) -> object:
    import triton.language as tl

    return tl.dtype(value["tl.dtype"]) if isinstance(value, dict) and "tl.dtype" in value else value


def _compile_here(req: CompileRequest) -> object:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    kernel = getattr(importlib.import_module(req.module), req.kernel)
    fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
    attrs = {}
    if req.divisible is not None:
        attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in req.divisible}
    elif req.aligned:
        attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]]
                 for name, kind in req.signature.items()
                 if kind.startswith("*") or (req.aligned_ints and kind == "i32")}
    constexprs = {k: _decode(v) for k, v in req.constexprs.items()}
    source = ASTSource(fn, signature=dict(req.signature), constexprs=constexprs,
                       attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", req.capability, 32),
                              options={"num_warps": req.num_warps, "num_stages": req.num_stages})
    if req.details:
        from .report import compiled_details

        return compiled_details(compiled, req.capability, req.num_warps)
    return int(compiled.metadata.shared)


class CompileJob:
    """``compile_report`` started in the background, so a test module can overlap it with its
    interpreter tests (the compile child takes the second core). ``results()`` waits."""

    def __init__(self, requests: List[CompileRequest]):
        self._proc = None
        if not INTERPRET:  # a GPU process compiles in place
            self._results: List[object] = [_try(r) for r in requests]
            return
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_INTERPRET"] = "0"  # explicit: kernels/__init__.py turns it on when CPU-only
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences triton 3.9's FutureWarning
        self._cache = tempfile.TemporaryDirectory()
        env["TRITON_CACHE_DIR"] = self._cache.name
        payload = os.path.join(self._cache.name, "requests.json")
        with open(payload, "w", encoding="utf-8") as handle:
            json.dump([dict(asdict(r), constexprs={k: _encode(v) for k, v in
                                                   r.constexprs.items()}) for r in requests],
                      handle)
        self._proc = subprocess.Popen([sys.executable, "-m", __name__, payload], env=env,
                                      text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def results(self, timeout: float = 900) -> List[object]:
        if self._proc is not None:
            out, err = self._proc.communicate(timeout=timeout)
            self._cache.cleanup()
            if self._proc.returncode != 0:
                raise RuntimeError(f"compile child failed:\n{err[-4000:]}")
            self._results, self._proc = json.loads(out.strip().splitlines()[-1]), None
        return self._results

    def cancel(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.communicate()
            self._cache.cleanup()


def compile_report(requests: List[CompileRequest]) -> List[object]:
    """Per request: its shared memory in bytes, or the compile error as text (nothing raises,
    so a test can report each row on its own)."""
    return CompileJob(requests).results()


def compile_many(requests: List[CompileRequest]) -> List[int]:
    """Shared memory (bytes per block) of each request. Raises naming the kernel on a compile
    error or when its shared memory exceeds the card's limit."""
    shared = []
    for req, res in zip(requests, compile_report(requests)):
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


if __name__ == "__main__":  # the child: a JSON file of requests; one JSON list on the last line
    with open(sys.argv[1], encoding="utf-8") as handle:
        reqs = [CompileRequest(**r) for r in json.load(handle)]
    print(json.dumps([_try(r) for r in reqs]))
