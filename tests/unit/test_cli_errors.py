"""What a user can get wrong ends in one line and exit 2, never a traceback; a finished run
never fails in its closing sample; one undecodable image does not stop a run.

Each CLI case runs ``python -m mm1_moe.cli`` in a subprocess, as a user would (about 5-25 s
each on a 2-core CPU: the start-up imports Megatron)."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TINY_MM1 = str(REPO / "configs" / "tiny-mm1-moe.yaml")
# one caption per 32-token sequence (16 image tokens + ~6 caption tokens): at micro-batch 1 a
# caption whose image does not decode empties its micro-batch
SMALL_RUN = ["train.save_interval=0", "train.save_final=false", "train.log_interval=1",
             "data.seq_length=32", "train.micro_batch_size=1", "train.global_batch_size=4",
             "data.weights=[0.0, 1.0, 0.0]"]


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    env.pop("MM1_MOE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "mm1_moe.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, command: str, *needles: str):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"mm1-moe {command}:")]
    assert len(lines) == 1, proc.stderr[-4000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def jpeg(colour=(30, 160, 40)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buffer, "JPEG")
    return buffer.getvalue()


def caption_shard(path: Path, broken: set, count: int = 12) -> str:
    """``count`` captions; those in ``broken`` have a zero-byte JPEG."""
    from mm1_moe.data.bundled import NUMBERS

    with tarfile.open(path, "w") as tar:
        for i in range(count):
            for name, data in ((f"{i:06d}.jpg", b"" if i in broken else jpeg()),
                               (f"{i:06d}.txt", f"caption {NUMBERS[i % 10]}.".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


# --- the error boundary ------------------------------------------------------------------------
def test_a_missing_shard_is_a_message(tmp_path):
    missing = tmp_path / "no-such-shard.tar"
    proc = cli("train", "--config", TINY_MM1, f"train.output_dir={tmp_path / 'run'}",
               f"data.captions=['{missing}']", *SMALL_RUN)
    assert_one_line_error(proc, "train", str(missing))


def test_a_source_with_no_usable_sample_is_a_message(tmp_path):
    shard = caption_shard(tmp_path / "captions.tar", broken=set(range(4)), count=4)
    proc = cli("train", "--config", TINY_MM1, f"train.output_dir={tmp_path / 'run'}",
               f"data.captions=['{shard}']", *SMALL_RUN)
    assert_one_line_error(proc, "train")


def test_a_load_from_that_does_not_exist_names_the_key(tmp_path):
    proc = cli("train", "--config", TINY_MM1, f"train.output_dir={tmp_path / 'run'}",
               f"train.load_from={tmp_path / 'nowhere'}", *SMALL_RUN)
    assert_one_line_error(proc, "train", "train.load_from")


def test_debug_shows_the_traceback(tmp_path):
    proc = cli("train", "--debug", "--config", TINY_MM1, f"train.output_dir={tmp_path / 'run'}",
               f"train.load_from={tmp_path / 'nowhere'}", *SMALL_RUN)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_data_inspect_and_info_use_the_same_boundary(tmp_path):
    assert_one_line_error(cli("data", "inspect", str(tmp_path / "none.tar")), "data inspect",
                          "none.tar")
    assert_one_line_error(cli("info", "--config", str(tmp_path / "none.yaml")), "info",
                          "none.yaml")


def test_no_loadable_checkpoint_is_a_message(tmp_path):
    run = tmp_path / "run"
    args = ("train", "--config", TINY_MM1, f"train.output_dir={run}", *SMALL_RUN)
    first = cli(*args, "train.steps=1", "train.save_final=true")
    assert first.returncode == 0, first.stderr[-4000:]
    for shard in (run / "checkpoints").rglob("*.distcp"):
        shard.write_bytes(b"not a checkpoint")
    proc = cli(*args, "train.steps=2")
    assert_one_line_error(proc, "train", "could be loaded")
    # the message gives each checkpoint's cause, not only an exception class
    assert "step_00000001" in proc.stdout + proc.stderr


# --- an emptied micro-batch ----------------------------------------------------------------------
def test_a_zero_byte_image_empties_a_micro_batch_without_stopping_the_run(tmp_path):
    shard = caption_shard(tmp_path / "captions.tar", broken={1})
    run = tmp_path / "run"
    proc = cli("train", "--config", TINY_MM1, f"train.output_dir={run}",
               f"data.captions=['{shard}']", "train.steps=3", *SMALL_RUN)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "no token to take a loss on" in proc.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["empty_microbatches"] for r in records) >= 1
    assert all(r["loss"] == r["loss"] and r["grad_norm"] == r["grad_norm"] for r in records)


def test_an_empty_micro_batch_has_zero_loss_and_gradient():
    from mm1_moe.training.loop import masked_lm_loss

    per_token = torch.rand(1, 8, requires_grad=True)
    loss, report = masked_lm_loss(torch.zeros(1, 8), per_token)
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(report["loss_tokens"]) == 0.0
    assert torch.count_nonzero(per_token.grad) == 0


# --- the closing sample --------------------------------------------------------------------------
class _Tokenizer:
    image_token_id, pad_id, bos_id, unk_id, eos_id, vocab_size = 4, 0, 2, 1, 3, 10

    def decode(self, ids, skip_special=True):
        return " ".join(f"w{i}" for i in ids)


class _FavoursSpecialTokens(torch.nn.Module):
    """Puts the highest logits on <image>, <pad>, <s>, <unk> and the ids past the tokenizer's
    vocabulary (10, 11: the model's vocabulary is 12); then word 7; </s> once three words are
    written."""

    def forward(self, ids, positions, images=None, images_per_sequence=None):
        logits = torch.zeros(1, ids.shape[1], 16)
        logits[..., [0, 1, 2, 4, 10, 11]] = 10.0
        logits[..., 7] = 5.0
        if ids.shape[1] >= 4 + 3:  # 4 image tokens, then three words
            logits[..., 3] = 20.0
        return logits


def test_the_caption_never_contains_a_special_token():
    from mm1_moe.config import load_config
    from mm1_moe.generate import greedy_caption

    config = load_config(TINY_MM1, ["model.connector.num_tokens=4",
                                    "model.decoder.vocab_size=12"])
    config.model.image_token_id = 4
    text = greedy_caption(_FavoursSpecialTokens(), config, _Tokenizer(), torch.zeros(3, 4, 4))
    assert text == "w7 w7 w7"


def test_a_failing_sample_never_fails_the_run(capsys, monkeypatch):
    from mm1_moe import cli as cli_module

    def broken(trainer):
        raise ValueError("placeholder count")

    monkeypatch.setattr(cli_module, "_sample_caption", broken)
    assert cli_module._safe_sample_caption(object(), rank=0) is None
    assert "sample caption failed" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["train", "--debug"], ["data", "inspect", "--debug", "x"]])
def test_every_command_takes_debug(argv):
    from mm1_moe.cli import _add_debug_flag, build_parser

    parser = build_parser()
    _add_debug_flag(parser)
    assert parser.parse_args(argv).debug is True
