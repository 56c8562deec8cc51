"""Loading a checkpoint runs no code from it.

A real tiny checkpoint is saved once; then a payload whose unpickling creates a marker folder
(``os.mkdir``) is planted in each kind of file the load path unpickles - DCP's ``.metadata``,
Megatron's ``common.pt``, a byte object and a tensor record inside a ``__*.distcp`` file - and
the load through ``train.load_from`` (and ``upcycle --from``) must refuse it: no marker, a
``CheckpointError`` naming the file and ``posix.mkdir``. Resume reports a refused newest
checkpoint and falls back bit for bit; a clean checkpoint restores parameters and every RNG
state exactly (RNG states are JSON now, not pickles).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import threading
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

from mm1_moe.config import load_config
from mm1_moe.training import rng_state, safe_load
from mm1_moe.training.checkpoint import CheckpointError, resume_latest
from mm1_moe.training.loop import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DENSE, MOE = str(CONFIGS / "tiny-dense.yaml"), str(CONFIGS / "tiny-moe.yaml")
REFUSED = "refused to unpickle posix.mkdir"  # os.mkdir is posix.mkdir on Linux


class _Payload:
    """Unpickling it calls ``os.mkdir(marker)``: the marker exists if and only if it ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def _config(*overrides: str):
    return load_config(DENSE, ["train.steps=2", *overrides])


def _snapshot(trainer) -> dict:
    return {"params": {n: p.detach().clone()
                       for n, p in trainer.model[0].module.named_parameters()},
            "rng": rng_state.capture()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 2-step tiny dense run saving at steps 1 and 2, with its state after step 2."""
    out = tmp_path_factory.mktemp("clean")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            mp.delenv(name, raising=False)
        end: dict = {}
        result = train(_config("train.save_interval=1", f"train.output_dir={out}"),
                       on_finish=lambda trainer: end.update(_snapshot(trainer)))
    return SimpleNamespace(root=out / "checkpoints", losses=result.losses, **end)


# --- planting payloads ---------------------------------------------------------------------------
def _read_metadata(step: Path):
    with open(step / ".metadata", "rb") as handle:  # our own clean file: plain pickle is fine
        return pickle.load(handle)


def _redirect(step: Path, kind, blob: bytes) -> str:
    """Append ``blob`` to the data file of an item of ``kind`` that the load reads (a module's
    ``_extra_state`` object, or the embedding) and point the item at it: the offsets live in
    .metadata, rewritten here with its own classes only."""
    meta = _read_metadata(step)
    part = "_extra_state" if kind is BytesStorageMetadata else "embedding"
    index = next(i for i in meta.storage_data
                 if isinstance(meta.state_dict_metadata[i.fqn], kind) and part in i.fqn)
    info = meta.storage_data[index]
    data = step / info.relative_path
    offset = data.stat().st_size
    data.write_bytes(data.read_bytes() + blob)
    meta.storage_data[index] = _StorageInfo(info.relative_path, offset, len(blob))
    with open(step / ".metadata", "wb") as handle:
        pickle.dump(meta, handle)
    return info.relative_path


def _saved_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _plant_metadata(step: Path, marker: Path) -> str:
    meta = _read_metadata(step)
    meta.planner_data = _Payload(marker)
    with open(step / ".metadata", "wb") as handle:
        pickle.dump(meta, handle)
    return ".metadata"


def _plant_common(step: Path, marker: Path, protocol: int = 2) -> str:
    common = torch.load(step / "common.pt", weights_only=True)
    common["extra"] = _Payload(marker)
    torch.save(common, step / "common.pt", pickle_protocol=protocol)
    return "common.pt"


PLANTS = {
    "metadata": _plant_metadata,
    "common_pt": _plant_common,
    # protocol 4 names the class with STACK_GLOBAL, an opcode torch's weights-only unpickler
    # stops at before it sees the name
    "common_pt_protocol_4": lambda step, marker: _plant_common(step, marker, protocol=4),
    # a ShardedObject (a module's _extra_state): DCP's load_bytes, weights_only=False in torch
    "distcp_object": lambda step, marker: _redirect(step, BytesStorageMetadata,
                                                    _saved_bytes([_Payload(marker)])),
    # a tensor record: DCP's read_data (weights_only=True there already; narrowed here)
    "distcp_tensor": lambda step, marker: _redirect(step, TensorStorageMetadata,
                                                    _saved_bytes(_Payload(marker))),
}


def _tampered(saved, tmp_path: Path, kind: str, step: int = 2):
    copy = tmp_path / "ckpt" / f"step_{step:08d}"
    shutil.copytree(saved.root / f"step_{step:08d}", copy)
    marker = tmp_path / f"ran_{kind}"
    return copy, marker, PLANTS[kind](copy, marker)


# --- the tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(PLANTS))
def test_planted_payload_is_refused_by_name(saved, tmp_path, kind):
    step, marker, file = _tampered(saved, tmp_path, kind)
    original = torch.load
    with pytest.raises(CheckpointError) as caught:
        train(_config(f"train.load_from={step}", f"train.output_dir={tmp_path / 'run'}"))
    message = str(caught.value)
    assert not marker.exists(), "the payload ran"
    assert REFUSED in message and os.path.join(str(step), file) in message, message
    assert torch.load is original and not safe_load._active  # the patch is gone


def test_upcycle_from_refuses_a_payload(saved, tmp_path):
    from mm1_moe.upcycle import upcycle

    step, marker, _ = _tampered(saved, tmp_path, "common_pt")
    with pytest.raises(CheckpointError, match=REFUSED):
        upcycle(str(step), load_config(MOE), str(tmp_path / "up"), verify=False)
    assert not marker.exists()


def test_resume_reports_a_refused_checkpoint_and_falls_back_bit_exact(saved, tmp_path, capsys):
    step, marker, _ = _tampered(saved, tmp_path, "distcp_object")
    shutil.copytree(saved.root / "step_00000001", step.parent / "step_00000001")
    run = tmp_path / "run"
    shutil.move(str(step.parent), str(run / "checkpoints"))
    result = train(_config(f"train.output_dir={run}", "train.save_final=false"))
    out = capsys.readouterr().out
    assert f"checkpoint {run / 'checkpoints' / 'step_00000002'} could not be loaded" in out
    assert REFUSED in out and "resumed from" in out and "step_00000001 at step 1" in out
    assert not marker.exists()
    assert result.losses == saved.losses[1:]  # step 2 again, bit for bit


def test_clean_checkpoint_restores_parameters_and_rng_exactly(saved, tmp_path):
    after: dict = {}
    train(_config(f"train.load_from={saved.root / 'step_00000002'}",
                  f"train.output_dir={tmp_path / 'run'}", "train.save_final=false"),
          on_finish=lambda trainer: after.update(_snapshot(trainer)))
    assert after["rng"] == saved.rng  # python, numpy, torch, Megatron tracker: JSON round trip
    assert after["params"].keys() == saved.params.keys()
    for name, value in saved.params.items():
        assert torch.equal(after["params"][name], value), name


def test_saved_pickles_reference_only_allowed_globals(saved):
    """What our checkpoint's pickles reference, recorded while loading a fresh (trusted) save:
    the .metadata within METADATA_ALLOWED, torch files within torch's weights-only set, and no
    RNG object anywhere (the allow-list is derived from this; a new Megatron class fails here
    by name)."""
    step = saved.root / "step_00000002"
    seen = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add(f"{module}.{name}")
            return super().find_class(module, name)

    recorder = SimpleNamespace(Unpickler=Recorder, load=lambda f, **kw: Recorder(f, **kw).load(),
                               __name__="recorder")
    with open(step / ".metadata", "rb") as handle:
        meta = Recorder(handle).load()
    assert all(safe_load._admitted(*g.rsplit(".", 1)) for g in seen), sorted(seen)
    assert not any("rng" in key for key in meta.state_dict_metadata)
    seen.clear()
    torch.load(step / "common.pt", weights_only=False, pickle_module=recorder)
    for index, info in meta.storage_data.items():
        data = (step / info.relative_path).read_bytes()[info.offset:info.offset + info.length]
        torch.load(io.BytesIO(data), weights_only=False, pickle_module=recorder)
    assert seen <= {"torch._utils._rebuild_tensor_v2", "collections.OrderedDict"}, seen
    rng_files = list((step / "rng").glob("*.json"))
    assert [f.name for f in rng_files] == ["pp0_tp0_dp0.json"]
    assert set(json.loads(rng_files[0].read_text())) == {"python", "numpy", "torch", "tracker"}
    assert {"scheduler", "data_state", "step"} <= set(json.loads(
        (step / "complete.json").read_text()))


def test_a_bad_rng_file_is_named_with_its_field(saved, tmp_path):
    step = tmp_path / "step_00000002"
    shutil.copytree(saved.root / "step_00000002", step)
    path = step / "rng" / "pp0_tp0_dp0.json"
    state = json.loads(path.read_text())
    state["torch"] = state["torch"][:-2]
    path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"pp0_tp0_dp0\.json: torch is not 5056 bytes"):
        train(_config(f"train.load_from={step}", f"train.output_dir={tmp_path / 'run'}"))


# --- the patch itself: where it reaches, scope, threads ------------------------------------------
def test_the_load_call_sites_resolve_through_the_patched_attributes(tmp_path):
    """megatron-core 0.16.1 / torch 2.13 call ``torch.load`` and ``pickle.load`` through their
    module attributes: a version that imports them by name would escape the patch (the
    payload tests would then fail too, this says where)."""
    from megatron.core.dist_checkpointing.strategies import common
    from torch.distributed.checkpoint import default_planner, filesystem

    assert common.torch is torch and default_planner.torch is torch
    assert filesystem.pickle is pickle and filesystem.torch is torch
    original = (torch.load, pickle.load)
    with safe_load.restricted_unpickling(str(tmp_path)):
        assert torch.load is safe_load._restricted_torch_load
        assert pickle.load is safe_load._restricted_pickle_load
        with safe_load.restricted_unpickling(str(tmp_path)):  # nested: stays patched
            pass
        assert torch.load is safe_load._restricted_torch_load
    assert (torch.load, pickle.load) == original


def test_megatrons_import_time_safe_globals_are_set_aside(tmp_path):
    """megatron.core registers numpy arrays (and 14 more) with torch.serialization at import,
    enough for the pickled numpy RNG state checkpoints used to hold; our torch files need none
    of them now, so the restricted load admits none."""
    import numpy as np

    torch.save({"rng": np.random.get_state()}, tmp_path / "numpy.pt")
    torch.save({"t": torch.arange(3)}, tmp_path / "tensor.pt")
    registered = set(torch.serialization.get_safe_globals())
    assert torch.load(tmp_path / "numpy.pt", weights_only=True)["rng"][0] == "MT19937"
    with pytest.raises(CheckpointError, match=r"numpy\.pt: refused to unpickle numpy\."):
        with safe_load.restricted_unpickling(str(tmp_path)):
            assert torch.equal(torch.load(tmp_path / "tensor.pt")["t"], torch.arange(3))
            torch.load(tmp_path / "numpy.pt")
    assert set(torch.serialization.get_safe_globals()) == registered  # given back


def test_a_read_on_another_thread_is_restricted_too(tmp_path):
    marker = tmp_path / "ran"
    blob = pickle.dumps(_Payload(marker))
    errors: list = []

    def read():
        try:
            pickle.load(io.BytesIO(blob))
        except CheckpointError as err:
            errors.append(str(err))

    with pytest.raises(CheckpointError, match=REFUSED):  # recorded, so the scope fails too
        with safe_load.restricted_unpickling(str(tmp_path)):
            worker = threading.Thread(target=read)
            worker.start()
            worker.join()
    assert not marker.exists() and len(errors) == 1 and REFUSED in errors[0]


# --- reporting: the reason, not the class name ---------------------------------------------------
def _dcp_failure(inner: BaseException) -> CheckpointException:
    try:
        raise inner
    except BaseException as err:  # noqa: BLE001 - DCP wraps whatever a rank raised
        summary = traceback.extract_tb(err.__traceback__)
        return CheckpointException("read", {1: (err, summary), 0: (err, summary)})


def test_no_loadable_checkpoint_lists_each_path_and_cause(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / "complete.json").write_text("{}")
    causes = {"step_00000002": _dcp_failure(RuntimeError("invalid load key, 'n'.")),
              "step_00000001": OSError("disk gone")}
    reports: list = []

    def load(path):
        raise causes[os.path.basename(path)]

    with pytest.raises(CheckpointError) as caught:
        resume_latest(str(root), load, reports.append)
    message = str(caught.value)
    assert "no checkpoint under" in message and "train.resume=false" in message
    assert (f"{root / 'step_00000002'}: rank 0 (and 1 more rank): RuntimeError: invalid load "
            "key, 'n'.") in message
    assert f"{root / 'step_00000001'}: OSError: disk gone" in message
    assert len(reports) == 2 and "RuntimeError: invalid load key" in reports[0]
