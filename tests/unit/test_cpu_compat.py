"""The Megatron CPU compatibility layer: it serves exactly the call sites it names, and fails
loudly when Megatron changes under it."""

import importlib
import inspect

import pytest
import torch

from mm1_moe.runtime import cpu_compat
from mm1_moe.runtime.cpu_compat import (
    PATCHED_CALL_SITES,
    REPLACED_FUNCTIONS,
    _CudaOnCpu,
    _TorchOnCpu,
    scan_cuda_call_sites,
)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only layer")


@pytest.mark.parametrize("module_name", sorted(PATCHED_CALL_SITES))
def test_named_call_sites_match_megatron_source(module_name):
    """If this fails, Megatron added, moved or removed a CUDA call in a patched module: check
    the new call against the proxy's stand-ins, then update PATCHED_CALL_SITES."""
    assert scan_cuda_call_sites(module_name) == PATCHED_CALL_SITES[module_name]


@pytest.mark.parametrize(
    "module_name,name",
    [(m, n) for m, repl in REPLACED_FUNCTIONS.items() for n in repl],
)
def test_replaced_functions_exist_with_compatible_signature(module_name, name):
    cpu_compat.apply_cpu_compat()
    module = importlib.import_module(module_name)
    replacement = REPLACED_FUNCTIONS[module_name][name]
    assert getattr(module, name) is replacement
    assert len(inspect.signature(replacement).parameters) >= 2


def test_replaced_originals_still_call_cuda():
    """The originals we swap out still do what we replace them for (CUDA-only code)."""
    source = inspect.getsource(importlib.import_module("megatron.core.optimizer.clip_grads"))
    assert "param.grad.type() == 'torch.cuda.FloatTensor'" in source
    source = inspect.getsource(importlib.import_module("megatron.core.tensor_parallel.random"))
    assert "default_generators" in source


def test_patched_modules_see_proxy_and_real_torch_is_untouched():
    cpu_compat.apply_cpu_compat()
    assert cpu_compat.apply_cpu_compat() is True  # idempotent
    for module_name in PATCHED_CALL_SITES:
        assert isinstance(importlib.import_module(module_name).torch, _TorchOnCpu)
    import torch as real

    assert not isinstance(real, _TorchOnCpu)
    assert real.cuda.is_available() is False
    with pytest.raises((AssertionError, RuntimeError)):
        real.cuda.current_device()  # the real CUDA API still refuses on CPU: no global shim


def test_proxy_maps_cuda_devices_to_cpu():
    proxy = _TorchOnCpu()
    assert proxy.zeros(2, device="cuda").device.type == "cpu"
    assert proxy.empty(3, device=0).device.type == "cpu"
    assert proxy.ones(1, device="cuda:1").device.type == "cpu"
    assert proxy.device("cuda") == torch.device("cpu")
    assert proxy.device("cpu") == torch.device("cpu")
    assert proxy.cuda.current_device() == torch.device("cpu")
    assert proxy.float32 is torch.float32 and proxy.Tensor is torch.Tensor


def test_cuda_rng_stand_ins_drive_the_cpu_generator():
    cuda = _CudaOnCpu()
    cuda.manual_seed(7)
    state = cuda.get_rng_state()
    a = torch.rand(3)
    cuda.set_rng_state(state)
    assert torch.equal(a, torch.rand(3))


def test_unknown_cuda_call_names_itself():
    with pytest.raises(AttributeError, match="torch.cuda.mem_get_info.*no CPU stand-in"):
        _CudaOnCpu().mem_get_info()


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
    cpu_compat._clip_grad_by_total_norm_on_cpu(params, 1.0, total)
    clipped = torch.sqrt(sum((p.grad**2).sum() for p in params))
    assert torch.isclose(clipped, torch.tensor(1.0), atol=1e-5)
    with pytest.raises(TypeError, match="float16"):
        p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))
        p.grad = torch.ones(2, dtype=torch.float16)
        cpu_compat._clip_grad_by_total_norm_on_cpu([p], 1.0, 10.0)
