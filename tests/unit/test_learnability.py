"""The vision path carries information: on the bundled captions, the tiny MM1 that sees the
images reaches a clearly lower caption loss than the same model fed blank images (same data,
seed, steps and schedule; ``data.blank_images`` is the only difference).

Captions name each shape's colour, kind and cell, which only the pixels tell; a blind model can
learn the grammar and the caption frequencies, nothing more. Two 160-step runs of the CLI, about
35-65 s each on a 2-core CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny-mm1-moe.yaml"
STEPS = 160  # the suite's budget; at 240 steps the gap is 0.32 vs 0.58
LAST = 20  # steps averaged: the per-step loss of 8 x 128 tokens moves by about 0.05


def _caption_loss(out: Path, *overrides: str) -> float:
    """Mean LM loss over the last ``LAST`` steps of a captions-only run of ``mm1-moe train``."""
    cmd = [sys.executable, "-m", "mm1_moe.cli", "train", "--config", str(CONFIG),
           f"train.output_dir={out}", f"train.steps={STEPS}", "train.save_final=false",
           "train.save_interval=0", "train.log_interval=60", "data.weights=[0.0, 1.0, 0.0]",
           "data.seq_length=128", "train.micro_batch_size=4", "train.global_batch_size=8",
           *overrides]
    # Two threads, as on the CI machine: the thread count changes float reduction orders.
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="2")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"$ {' '.join(cmd)}\n{proc.stderr[-4000:]}"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return sum(r["loss"] for r in records[-LAST:]) / LAST


def test_images_lower_the_caption_loss(tmp_path):
    seeing = _caption_loss(tmp_path / "images")
    blind = _caption_loss(tmp_path / "blank", "data.blank_images=true")
    # Measured (2-core CPU): 0.47 with images vs 0.63 blank at 160 steps (0.32 vs 0.58 at 240;
    # with train.seed=1 at 240, 0.35 vs 0.57).
    # At lr 3e-3, 0.37 vs 0.52 after 300 steps (an earlier version ignored the images there).
    assert seeing < blind - 0.1, f"caption loss {seeing:.3f} with images vs {blind:.3f} blank"
