"""Per-step metrics: throughput and MFU, a JSONL log, TensorBoard when installed.

MFU = achieved model FLOP/s per GPU / the device's dense bf16 peak. Model FLOPs per token come
from ``mm1_moe.info`` (6 x active matmul parameters + causal attention, i.e. 3 x forward); the
peak from ``PEAK_TFLOPS`` by device name, or ``train.peak_tflops``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any, Dict, Optional

import torch

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' datasheets.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def device_peak_tflops(override: Optional[float] = None) -> Optional[float]:
    """The configured peak, else the table's entry for this GPU, else None (CPU: no MFU)."""
    if override is not None:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


class MetricsLog:
    """Rank 0's step log: one JSON object per line in ``<output_dir>/metrics.jsonl``, and the
    scalars to TensorBoard (``<output_dir>/tensorboard``) when the package is installed."""

    def __init__(self, output_dir: str):
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        except (ImportError, ModuleNotFoundError):
            pass

    def write(self, record: Dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = record["step"]
            for key, value in _flatten(record).items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()


def _flatten(record: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out


def step_record(entry) -> Dict[str, Any]:
    """A StepLog as plain JSON data (MoE layers keyed by their number as text)."""
    record = asdict(entry)
    record["moe"] = {str(k): v for k, v in entry.moe.items()}
    return record
