"""Once-per-process set-up and the one decision behind ``kernels.*: auto``."""

import subprocess
import sys

import pytest
import torch

from mm1_moe.runtime import process


def test_auto_kernels_are_decided_when_the_runtime_starts(monkeypatch, runtime):
    rt, _ = runtime
    expected = process.AUTO_ON_GPU if torch.cuda.is_available() else process.AUTO_ON_CPU
    assert rt.kernels == expected
    assert process.kernel_for("moe", "auto") == expected["moe"]
    assert process.kernel_for("attention", "auto") == expected["attention"]
    assert process.kernel_for("moe", "triton") == "triton"  # a named choice is kept
    monkeypatch.setattr(process, "_auto", None)
    with pytest.raises(RuntimeError, match="kernels.moe=auto.*initialize"):
        process.kernel_for("moe", "auto")


def test_a_command_prints_no_megatron_import_notes(tmp_path):
    """setup_process() once, then megatron.core's import-time notes about Apex/TE are gone,
    and other warnings still show."""
    code = ("import warnings; from mm1_moe.runtime import setup_process; setup_process(); "
            "setup_process(); import megatron.core.optimizer; "
            "warnings.warn('still shown', UserWarning)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Apex" not in done.stderr and "Transformer Engine" not in done.stderr
    assert "still shown" in done.stderr


def test_the_cli_sets_up_before_anything_imports_megatron(configs_dir, tmp_path):
    """The parser imports the upcycle command (hence Megatron): set-up must come first."""
    import os

    done = subprocess.run([sys.executable, "-m", "mm1_moe.cli", "info", "--config",
                           os.path.join(configs_dir, "tiny-moe.yaml")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Apex" not in done.stderr and "Transformer Engine" not in done.stderr, done.stderr
