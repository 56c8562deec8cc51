"""Every workaround for megatron-core, in one registry, applied in one place.

One module per concern; each exports a frozen :class:`~.record.Patch` (name, targets, when:
cpu | always, why, ``check()``, ``apply()`` returning its own revert, ``probe()``). ``REGISTRY``
lists them in the order they are applied. :func:`apply_megatron_patches` first checks the
installed megatron-core against ``SUPPORTED_MEGATRON`` and then applies the entries due on this
machine, once per process; ``tests/unit/test_megatron_patches.py`` checks every entry on every
machine (the upstream behaviour still needs it, apply then revert restores the original, the
probe passes).

Moving to a new megatron-core: install it, run that test with
``MM1_MOE_ALLOW_MEGATRON=<version>`` set, fix or drop each entry whose ``check()`` fails (the
message says which upstream line changed), then add the version to ``SUPPORTED_MEGATRON``.
No workaround lives outside this package (README, "Megatron workarounds").
"""

from __future__ import annotations

import os
from importlib import metadata
from typing import Dict, List, Tuple

from . import (aux_loss_scale, ckpt_writer_manager, cpu_clip_grads, cpu_rng_state,
               cpu_tensor_type, cpu_torch_proxy, distopt_adam_step, distopt_fp32_params_order,
               gloo_p2p, import_warnings, mixed_precision_fp32_params, te_unbound_names,
               unknown_mlp_log)
from .gloo_p2p import p2p_settings
from .record import Patch, Revert

SUPPORTED_MEGATRON = ("0.16.1",)
ALLOW_ENV = "MM1_MOE_ALLOW_MEGATRON"

REGISTRY: Tuple[Patch, ...] = (
    import_warnings.PATCH,  # first: megatron.core warns while the others import it
    te_unbound_names.PATCH,
    aux_loss_scale.PATCH,
    unknown_mlp_log.PATCH,
    cpu_torch_proxy.PATCH,
    cpu_rng_state.PATCH,
    cpu_clip_grads.PATCH,
    cpu_tensor_type.PATCH,
    gloo_p2p.PATCH,
    distopt_adam_step.PATCH,
    distopt_fp32_params_order.PATCH,
    mixed_precision_fp32_params.PATCH,
    ckpt_writer_manager.PATCH,
)
BY_NAME: Dict[str, Patch] = {p.name: p for p in REGISTRY}

_applied: Dict[str, Revert] = {}


class UnsupportedMegatron(RuntimeError):
    """The installed megatron-core is not one the registry was checked against."""


def installed_megatron() -> str:
    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        raise UnsupportedMegatron(
            "megatron-core is not installed (pip install 'megatron-core==0.16.1')") from None


def check_megatron_version() -> str:
    """The installed version, if ``SUPPORTED_MEGATRON`` (or ``$MM1_MOE_ALLOW_MEGATRON``) names
    it; otherwise UnsupportedMegatron naming the registry and its test."""
    version = installed_megatron()
    allowed = set(SUPPORTED_MEGATRON) | {os.environ.get(ALLOW_ENV, "").strip()} - {""}
    if version not in allowed:
        raise UnsupportedMegatron(
            f"megatron-core {version} is installed; mm1-moe's workarounds "
            f"(mm1_moe/runtime/megatron_patches/) are checked against "
            f"{', '.join(SUPPORTED_MEGATRON)}. Install megatron-core=={SUPPORTED_MEGATRON[-1]}, "
            f"or port the registry: run tests/unit/test_megatron_patches.py with "
            f"{ALLOW_ENV}={version} and fix each entry whose check fails.")
    return version


def due(patch: Patch, on_cpu: bool) -> bool:
    return patch.kind == "patch" and (patch.when == "always" or on_cpu)


def apply_patch(patch: Patch) -> None:
    """Apply one entry (idempotent: an applied entry is left as it is)."""
    if patch.name not in _applied:
        _applied[patch.name] = patch.apply()


def revert_patch(patch: Patch) -> bool:
    """Undo one entry; False when it was not applied."""
    revert = _applied.pop(patch.name, None)
    if revert is None:
        return False
    revert()
    return True


def applied() -> List[str]:
    return [p.name for p in REGISTRY if p.name in _applied]


def apply_megatron_patches(on_cpu: bool) -> List[str]:
    """Check the megatron-core version, then apply every entry due on this machine (``always``,
    plus ``cpu`` without a GPU), in registry order. Idempotent. Returns the applied names."""
    check_megatron_version()
    for patch in REGISTRY:
        if due(patch, on_cpu):
            apply_patch(patch)
    return applied()


__all__ = ["BY_NAME", "REGISTRY", "SUPPORTED_MEGATRON", "Patch", "UnsupportedMegatron",
           "applied", "apply_megatron_patches", "apply_patch", "check_megatron_version", "due",
           "p2p_settings", "revert_patch"]
