"""Distributed-optimizer checkpoints load back, in one process: a resumed run repeats the
uninterrupted one bit for bit; Adam's moments and step survive distributed -> distributed,
distributed -> plain and plain -> distributed, compared tensor by tensor by global name; and the
installed megatron-core still fails without the registry's fix (``distopt_adam_step``), so the
fix goes when upstream no longer needs it.

configs/tiny-moe.yaml: a chained optimizer (dense + expert parameters), fp32, ``kernels.moe=torch``;
configs/tiny-dense.yaml: one optimizer, layers stacked on one key. The multi-rank moves
(DP2 x EP2, kill -9, DP 2 -> 1 and 2 -> 4) are in
``tests/distributed/test_distributed_optimizer_resume.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mm1_moe.config import load_config
from mm1_moe.runtime import megatron_patches as registry
from mm1_moe.training.optimizer_state import adam_state_pieces, merge_adam_state

MOE = str(Path(__file__).resolve().parents[2] / "configs" / "tiny-moe.yaml")
DENSE = str(Path(__file__).resolve().parents[2] / "configs" / "tiny-dense.yaml")


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def _config(out: Path, distributed: bool, path: str = MOE):
    return load_config(path, ["kernels.moe=torch", "train.steps=4", f"train.output_dir={out}",
                              f"train.distributed_optimizer={str(distributed).lower()}"])


def _adam(trainer):
    return merge_adam_state(adam_state_pieces(trainer.model, trainer.optimizer))


def assert_same_adam_state(got, expected, step, experts=True):
    """Every tensor's exp_avg and exp_avg_sq equal bit for bit, and the step."""
    assert sorted(got) == sorted(expected)
    assert any(".experts." in key for key in got) == experts  # the expert optimizer's too
    for key, entry in expected.items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(got[key][name], entry[name]), f"{key} {name}"
        assert entry["exp_avg_sq"].any(), key  # moments that a dropped load would zero
        assert got[key]["step"] == entry["step"] == step, key


def test_moments_and_step_survive_every_move_and_resume_is_exact(tmp_path):
    from mm1_moe.runtime import initialize, shutdown
    from mm1_moe.training.loop import Trainer

    runtime = initialize(_config(tmp_path / "a", True))
    try:
        run = Trainer(_config(tmp_path / "a", True), runtime)
        for _ in range(2):
            run.train_step()
        saved = run.save()
        at_2 = _adam(run)
        uninterrupted = [run.train_step().loss for _ in range(2)]

        resumed = Trainer(_config(tmp_path / "b", True), runtime)  # distributed -> distributed
        assert resumed.load(saved)["step"] == 2
        assert_same_adam_state(_adam(resumed), at_2, step=2.0)
        # each parameter's step advances by one per step (upstream shares one tensor)
        assert [resumed.train_step().loss for _ in range(2)] == uninterrupted
        assert_same_adam_state(_adam(resumed), _adam(run), step=4.0)

        plain = Trainer(_config(tmp_path / "c", False), runtime)  # distributed -> plain
        plain.load(saved)
        assert_same_adam_state(_adam(plain), at_2, step=2.0)
        plain_saved = plain.save()

        back = Trainer(_config(tmp_path / "d", True), runtime)  # plain -> distributed
        back.load(plain_saved)
        assert_same_adam_state(_adam(back), at_2, step=2.0)
        assert [back.train_step().loss for _ in range(2)] == uninterrupted
    finally:
        shutdown()


def test_one_optimizer_with_stacked_layers_to_plain_and_back(tmp_path):
    """configs/tiny-dense.yaml: a single (unchained) optimizer, and layers stacked on one key
    (``decoder.layers.mlp.linear_fc2.weight`` at offset (layer, 0, 0))."""
    from mm1_moe.runtime import initialize, shutdown
    from mm1_moe.training.loop import Trainer

    runtime = initialize(_config(tmp_path / "a", True, DENSE))
    try:
        run = Trainer(_config(tmp_path / "a", True, DENSE), runtime)
        run.train_step()
        expected = _adam(run)
        plain = Trainer(_config(tmp_path / "b", False, DENSE), runtime)
        plain.load(run.save())
        assert_same_adam_state(_adam(plain), expected, step=1.0, experts=False)
        back = Trainer(_config(tmp_path / "c", True, DENSE), runtime)
        back.load(plain.save())
        assert_same_adam_state(_adam(back), expected, step=1.0, experts=False)
    finally:
        shutdown()


def test_upstream_still_fails_without_the_fix(tmp_path):
    """The installed megatron-core, with the registry's fix reverted: loading into a fresh
    distributed optimizer trips its step assertion, into a stepped one the loader's KeyError
    'step'. When this fails, upstream loads torch Adam's state itself: drop the entry."""
    from mm1_moe.runtime import initialize, shutdown
    from mm1_moe.training.loop import Trainer

    patch = registry.BY_NAME["distopt_adam_step"]
    runtime = initialize(_config(tmp_path / "a", True))
    was_applied = registry.revert_patch(patch)
    try:
        run = Trainer(_config(tmp_path / "a", True), runtime)
        run.train_step()
        saved = run.save()
        with pytest.raises(AssertionError):
            Trainer(_config(tmp_path / "b", True), runtime).load(saved)
        with pytest.raises(KeyError, match="step"):
            run.load(saved)
    finally:
        if was_applied:
            registry.apply_patch(patch)
        shutdown()
