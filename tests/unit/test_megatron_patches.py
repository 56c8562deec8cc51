"""The registry of Megatron-core workarounds (mm1_moe/runtime/megatron_patches/), on every
machine: each entry's upstream behaviour still needs it, apply then revert restores what it
changed, its probe passes; the version gate; and no workaround outside the registry."""

import ast
import importlib
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch

from mm1_moe.runtime import megatron_patches as registry
from mm1_moe.runtime.megatron_patches import REGISTRY, cpu_clip_grads, record
from mm1_moe.runtime.megatron_patches.cpu_torch_proxy import (PATCHED_CALL_SITES, CudaOnCpu,
                                                              TorchOnCpu, scan_cuda_call_sites)

REPO = pathlib.Path(__file__).resolve().parents[2]
IDS = [p.name for p in REGISTRY]


@pytest.mark.parametrize("patch", REGISTRY, ids=IDS)
def test_upstream_still_needs_it(patch):
    """A failure names the upstream line that changed: read it, then fix or drop the entry."""
    assert patch.check() == []


@pytest.mark.parametrize("patch", REGISTRY, ids=IDS)
def test_apply_probe_revert_restores_the_original(patch):
    if patch.kind == "setting":
        patch.probe()
        return
    was_applied = registry.revert_patch(patch)  # an earlier runtime may have applied it
    original = record.snapshot(patch)
    try:
        registry.apply_patch(patch)
        assert not record.same_snapshot(record.snapshot(patch), original) or \
            patch.name == "te_unbound_names" and not _te_missing()
        patch.probe()
        registry.revert_patch(patch)
        assert record.same_snapshot(record.snapshot(patch), original)
    finally:
        registry.revert_patch(patch)
        if was_applied:
            registry.apply_patch(patch)


def _te_missing() -> bool:
    module = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    return not getattr(module, "HAVE_TE", False)


def test_registry_names_are_unique_and_ordered():
    assert len(set(IDS)) == len(IDS)
    assert IDS[0] == "import_warnings"  # before anything imports megatron.core
    assert all(p.when in ("cpu", "always") for p in REGISTRY)
    assert all(p.why and p.targets or p.kind == "setting" for p in REGISTRY)


def test_unsupported_version_is_refused_by_name(monkeypatch):
    monkeypatch.setattr(registry, "installed_megatron", lambda: "0.99.0")
    monkeypatch.delenv(registry.ALLOW_ENV, raising=False)
    with pytest.raises(registry.UnsupportedMegatron,
                       match=r"0\.99\.0.*megatron_patches.*test_megatron_patches\.py"):
        registry.apply_megatron_patches(on_cpu=True)
    monkeypatch.setenv(registry.ALLOW_ENV, "0.99.0")  # porting: run the checks on the new one
    assert registry.check_megatron_version() == "0.99.0"


def test_installed_version_is_supported():
    assert registry.check_megatron_version() in registry.SUPPORTED_MEGATRON


def test_runtime_applies_what_is_due(runtime):
    on_cpu = not torch.cuda.is_available()
    due = [p.name for p in REGISTRY if registry.due(p, on_cpu)]
    assert set(due) <= set(registry.applied())
    if not on_cpu:
        assert not any(BY.when == "cpu" for BY in REGISTRY if BY.name in registry.applied())


def test_revert_of_an_unbound_name_unbinds_it():
    class Owner:
        pass

    module = type(importlib)("scratch_module")
    module.Owner = Owner
    import sys

    sys.modules["scratch_module"] = module
    try:
        undo = record.rebind("scratch_module:Owner.added", 1)
        assert Owner.added == 1
        undo()
        assert not hasattr(Owner, "added")
    finally:
        del sys.modules["scratch_module"]


# --- the CPU torch proxy ------------------------------------------------------------------

@pytest.mark.parametrize("module_name", sorted(PATCHED_CALL_SITES))
def test_named_call_sites_match_megatron_source(module_name):
    """Megatron added, moved or removed a CUDA call in a patched module: check the new call
    against the proxy's stand-ins, then update PATCHED_CALL_SITES."""
    assert scan_cuda_call_sites(module_name) == PATCHED_CALL_SITES[module_name]


def test_proxy_maps_cuda_devices_to_cpu():
    proxy = TorchOnCpu()
    assert proxy.zeros(2, device="cuda").device.type == "cpu"
    assert proxy.empty(3, device=0).device.type == "cpu"
    assert proxy.ones(1, device="cuda:1").device.type == "cpu"
    assert proxy.device("cuda") == torch.device("cpu")
    assert proxy.device("cpu") == torch.device("cpu")
    assert proxy.cuda.current_device() == torch.device("cpu")
    assert proxy.float32 is torch.float32 and proxy.Tensor is torch.Tensor


@pytest.mark.skipif(torch.cuda.is_available(), reason="the real CUDA API works on a GPU")
def test_real_torch_is_untouched(runtime):
    import torch as real

    assert not isinstance(real, TorchOnCpu)
    with pytest.raises((AssertionError, RuntimeError)):
        real.cuda.current_device()  # the real CUDA API still refuses on CPU: no global shim


def test_cuda_rng_stand_ins_drive_the_cpu_generator():
    cuda = CudaOnCpu()
    cuda.manual_seed(7)
    state = cuda.get_rng_state()
    a = torch.rand(3)
    cuda.set_rng_state(state)
    assert torch.equal(a, torch.rand(3))


def test_unknown_cuda_call_names_itself():
    with pytest.raises(AttributeError, match="torch.cuda.mem_get_info.*no CPU stand-in"):
        CudaOnCpu().mem_get_info()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU RNG tracker")
def test_rng_tracker_forks_a_distinct_stream_and_restores_the_default(runtime):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        inside = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(inside, torch.rand(4))


def test_clip_grad_replacement_scales_like_megatron():
    grads = [torch.full((3,), 2.0), torch.full((2,), 2.0)]
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        params.append(p)
    total = float(torch.sqrt(sum((g**2).sum() for g in grads)))
    cpu_clip_grads.clip_grad_by_total_norm_on_cpu(params, 1.0, total)
    clipped = torch.sqrt(sum((p.grad**2).sum() for p in params))
    assert torch.isclose(clipped, torch.tensor(1.0), atol=1e-5)
    with pytest.raises(TypeError, match="float16"):
        p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))
        p.grad = torch.ones(2, dtype=torch.float16)
        cpu_clip_grads.clip_grad_by_total_norm_on_cpu([p], 1.0, 10.0)


# --- nothing outside the registry ---------------------------------------------------------

def _monkeypatches(path: pathlib.Path):
    """Rebindings of names imported from megatron (``X.attr = ...``, ``setattr(X, ...)``),
    filters on Megatron's loggers and process-wide warning filters, in one source file."""
    tree = ast.parse(path.read_text(), str(path))
    megatron_names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron"):
            megatron_names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            megatron_names |= {(a.asname or a.name).split(".")[0] for a in node.names
                               if a.name.startswith("megatron")}

    def base(node):
        while isinstance(node, ast.Attribute):
            node = node.value
        return node.id if isinstance(node, ast.Name) else None

    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            if isinstance(target, ast.Attribute) and base(target) in megatron_names:
                yield f"{path.relative_to(REPO)}:{node.lineno}: assigns {ast.unparse(target)}"
        if isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            if func == "setattr" and node.args and base(node.args[0]) in megatron_names:
                yield f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}"
            if func in ("warnings.filterwarnings", "warnings.simplefilter") or \
                    func.endswith(".addFilter"):
                yield f"{path.relative_to(REPO)}:{node.lineno}: {func}"


def test_no_workaround_outside_the_registry():
    registry_dir = REPO / "mm1_moe" / "runtime" / "megatron_patches"
    files = [p for folder in ("mm1_moe", "kernels", "benchmarks")
             for p in (REPO / folder).rglob("*.py") if registry_dir not in p.parents]
    found = [hit for path in files for hit in _monkeypatches(path)]
    assert found == [], "workarounds belong in mm1_moe/runtime/megatron_patches/:\n" + \
        "\n".join(found)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG)")
def test_checkpoint_writer_manager_dies_with_a_killed_trainer():
    """A process that saved a checkpoint and was killed with SIGKILL leaves no writer manager
    behind (upstream's outlives it: the kill -9 tests left one ~270 MB process each)."""
    code = ("from mm1_moe.runtime import setup_process; setup_process()\n"
            "from mm1_moe.runtime.megatron_patches import BY_NAME\n"
            "from mm1_moe.runtime.megatron_patches.ckpt_writer_manager import manager_pid\n"
            "BY_NAME['ckpt_writer_manager'].apply()\n"
            "print(manager_pid(), flush=True)\n"
            "import time; time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(proc.stdout.readline())
        os.kill(pid, 0)  # alive while its parent is
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    pytest.fail(f"the writer manager (pid {pid}) outlived its killed parent")
