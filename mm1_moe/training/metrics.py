"""Per-step metrics: throughput and MFU, a JSONL log, TensorBoard when installed.

MFU = achieved model FLOP/s per GPU / the device's dense bf16 peak. Model FLOPs per token come
from ``mm1_moe.info`` (6 x active matmul parameters + causal attention, i.e. 3 x forward); the
peak from ``PEAK_TFLOPS`` by device name, or ``train.peak_tflops``.
"""

from __future__ import annotations

import json
import os
import time
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
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._tb = None
        self._open_tensorboard(purge_step=None)

    def _open_tensorboard(self, purge_step: Optional[int]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except (ImportError, ModuleNotFoundError):
            return
        if self._tb is not None:
            self._tb.close()
        self._tb = SummaryWriter(os.path.join(self.output_dir, "tensorboard"),
                                 purge_step=purge_step)

    def resume_at(self, step: int) -> int:
        """Forget the records of steps after ``step`` (a resumed run trains them again, so the
        log keeps one record per step); TensorBoard purges them too. The file is rewritten
        atomically. A run that starts from step 0 over an old log (train.resume=false in a used
        output_dir) moves that log aside instead, to ``metrics.<time>.jsonl``: nothing is
        deleted. Returns the number of records dropped or moved."""
        if not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
            return 0
        if step == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = os.path.join(self.output_dir, f"metrics.{stamp}.jsonl")
            with open(self.path, encoding="utf-8") as handle:
                moved = sum(1 for _ in handle)
            os.replace(self.path, aside)
            print(f"metrics: the earlier log of {self.output_dir} ({moved} records) moved to "
                  f"{aside}", flush=True)
            return moved
        kept, dropped = [], 0
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    later = json.loads(line).get("step", 0) > step
                except (json.JSONDecodeError, AttributeError, TypeError):
                    later = False  # not ours to judge: keep a line we cannot read
                if later:
                    dropped += 1
                else:
                    kept.append(line if line.endswith("\n") else line + "\n")
        if dropped:
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.writelines(kept)
            os.replace(tmp, self.path)
            self._open_tensorboard(purge_step=step + 1)
        return dropped

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
