"""Test set-up shared by every tier (unit -> distributed -> gpu_only).

On a machine without a GPU, Triton kernels run in the interpreter: the kernels package sets
``TRITON_INTERPRET`` when it is imported (``kernels/__init__.py``, the one place that does),
which must happen before triton's first import (its own ``triton.language`` helpers are
decorated then), so mm1_moe is imported here, before any test module imports Megatron (which
imports triton). ``TORCHDYNAMO_DISABLE`` keeps fused paths from compiling C++ on first use.
"""

import os

import torch

import mm1_moe  # noqa: F401  (the interpreter switch, before anything imports triton)

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu_only: no CUDA GPU on this machine")
    for item in items:
        if "gpu_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def configs_dir() -> str:
    return CONFIGS


@pytest.fixture
def runtime():
    """A started single-process runtime for the tiny dense config; torn down afterwards.
    Tests that need another config call ``mm1_moe.runtime.initialize`` themselves."""
    from mm1_moe.config import load_config
    from mm1_moe.runtime import initialize, shutdown

    config = load_config(os.path.join(CONFIGS, "tiny-dense.yaml"))
    yield initialize(config), config
    shutdown()
