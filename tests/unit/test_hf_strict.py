"""Hugging Face Llama folders are read strictly: every tensor from a file, none filled at random.

``from_pretrained`` fills a missing tensor with its random init and drops an extra one; upcycling
then checked the MoE model against the same random weights and said "preserved" (max diff 0)
while here a missing layer-1 up_proj moved the folder's logits by 0.021 and a missing lm_head by
0.45 (logits up to 0.43). Of the 21 damaged folders below, that path accepted 13 and ended 8 in
a foreign traceback (RuntimeError, SafetensorError, OSError, UnpicklingError).

Each folder is a tiny LlamaForCausalLM (configs/tiny-moe.yaml's decoder: 4 layers, D 64, F 128,
vocab 256; weights perturbed off their constant init) saved by ``save_pretrained`` (one file, or
~100 KB shards) or as .bin files, then damaged one way; ``upcycle`` (what ``mm1-moe upcycle``
calls) must refuse it with a message naming the tensor and the file, and write nothing. The
intact folders upcycle to the logits of the transformers model itself (an oracle we did not
write), bf16 and tied-embedding ones included.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict

import pytest
import torch

from mm1_moe.config import load_config
from mm1_moe.interop import InteropError, llama_config
from mm1_moe.interop.llama import llama_shapes
from mm1_moe.upcycle import UpcycleError, upcycle
from mm1_moe.upcycle.verify import ATOL

RTOL = 1e-5  # the fp32 check at these tiny widths (mm1_moe.upcycle.verify.fp32_rtol: 1.1e-5)

from _reference_models import perturbed

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MOE = str(CONFIGS / "tiny-moe.yaml")
INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"
UP1 = "model.layers.1.mlp.up_proj.weight"
UP9 = "model.layers.9.mlp.up_proj.weight"  # the model has 4 layers
K2 = "model.layers.2.self_attn.k_proj.weight"  # [KV heads 2 x hd 16, D 64] = (32, 64)
EXTRA = "model.layers.0.mlp.extra_proj.weight"


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)


def _moe(*overrides: str):
    return load_config(MOE, list(overrides))


def _llama(seed: int = 0, **config_changes):
    torch.manual_seed(seed)
    hf_config = llama_config(_moe())
    for key, value in config_changes.items():
        setattr(hf_config, key, value)
    return perturbed(transformers.LlamaForCausalLM(hf_config))


def _save_bin(model, folder: Path, shards: int) -> None:
    """What transformers 4 wrote with safe_serialization=False (5 writes safetensors only):
    config.json and one pytorch_model.bin, or ``shards`` files and their index."""
    model.config.save_pretrained(folder)
    state = {k: t.clone() for k, t in model.state_dict().items()}
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return
    names = sorted(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = names[i::shards]
        torch.save({n: state[n] for n in part}, folder / file)
        weight_map.update({n: file for n in part})
    (folder / BIN_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Dict[str, Path]:
    """Intact folders of one model: single file, shards, .bin, sharded .bin."""
    model = _llama()
    root = tmp_path_factory.mktemp("llama")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="100KB")
    assert len(list((root / "sharded").glob("*.safetensors"))) > 2
    for name, shards in (("bin", 1), ("bin_sharded", 3)):
        (root / name).mkdir()
        _save_bin(model, root / name, shards)
    return {name: root / name for name in ("single", "sharded", "bin", "bin_sharded")}


@pytest.fixture(scope="module")
def model():
    return _llama()


# --- the damage, one way per case ------------------------------------------------------------


def _edit_tensors(path: Path, edit: Callable[[Dict[str, torch.Tensor]], None]) -> None:
    if path.suffix == ".bin":
        tensors = torch.load(path, weights_only=True)
        edit(tensors)
        torch.save(tensors, path)
    else:
        tensors = safetensors_torch.load_file(str(path))
        edit(tensors)
        safetensors_torch.save_file(tensors, str(path), metadata={"format": "pt"})


def _index(folder: Path, name: str = INDEX) -> dict:
    return json.loads((folder / name).read_text())


def _write_index(folder: Path, index: dict, name: str = INDEX) -> None:
    (folder / name).write_text(json.dumps(index))


def _shard_of(folder: Path, tensor: str, name: str = INDEX) -> str:
    return _index(folder, name)["weight_map"][tensor]


def _delete(tensor: str):
    return lambda tensors: tensors.pop(tensor)


def _add(tensor: str):
    return lambda tensors: tensors.__setitem__(tensor, torch.zeros(8, 64))


def _transpose(tensor: str):
    return lambda tensors: tensors.__setitem__(tensor, tensors[tensor].t().contiguous())


def _in_shard(tensor: str, edit, index_too: str = "") -> Callable[[Path], None]:
    """Edit the shard the index places ``tensor`` in (a new one: beside layer 1's up_proj);
    ``index_too``: "drop" it from the index, or "add" it there."""
    def damage(folder: Path) -> None:
        index = _index(folder)
        shard = index["weight_map"].get(tensor) or index["weight_map"][UP1]
        _edit_tensors(folder / shard, edit)
        if index_too == "drop":
            del index["weight_map"][tensor]
        elif index_too == "add":
            index["weight_map"][tensor] = shard
        _write_index(folder, index)
    return damage


def _drop_shard(folder: Path) -> None:
    os.remove(folder / _shard_of(folder, UP1))


def _index_names(tensor: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        index = _index(folder)
        index["weight_map"][tensor] = _shard_of(folder, UP1)
        _write_index(folder, index)
    return damage


def _single(edit) -> Callable[[Path], None]:
    return lambda folder: _edit_tensors(folder / "model.safetensors", edit)


def _garbage(file: str) -> Callable[[Path], None]:
    return lambda folder: (folder / file).write_bytes(b"\x00" * 64)


class _Payload:  # a pickled object that only a full (code-running) unpickle could rebuild
    pass


def _bin_with(key: str, value) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        state = torch.load(folder / "pytorch_model.bin", weights_only=True)
        state[key] = value
        torch.save(state, folder / "pytorch_model.bin")
    return damage


SHARD = r"model-\d{5}-of-\d{5}\.safetensors"
BIN_SHARD = r"pytorch_model-\d{5}-of-00003\.bin"
DAMAGE = {
    # one file
    "missing_tensor": ("single", _single(_delete(UP1)),
                       rf"missing tensor {UP1}: not in model\.safetensors"),
    "extra_tensor": ("single", _single(_add(EXTRA)),
                     rf"unexpected tensor {EXTRA} in model\.safetensors"),
    "reshaped_tensor": ("single", _single(_transpose(K2)),
                        rf"{K2} in model\.safetensors: shape \(64, 32\), expected \(32, 64\)"),
    "untied_lm_head_missing": ("single", _single(_delete("lm_head.weight")),
                               r"missing tensor lm_head\.weight: not in model\.safetensors "
                               r"\(config\.json: tie_word_embeddings false\)"),
    "integer_tensor": ("single", _single(lambda t: t.__setitem__(
        "model.norm.weight", torch.ones(64, dtype=torch.int32))),
        r"model\.norm\.weight in model\.safetensors: dtype torch\.int32, expected a floating"),
    "not_safetensors": ("single", _garbage("model.safetensors"),
                        r"cannot read .*model\.safetensors: .*header"),
    "single_file_beside_an_index": ("single", lambda f: _write_index(f, {"weight_map": {}}),
                                    rf"holds both model\.safetensors and {INDEX}"),
    "no_weights": ("single", lambda f: os.remove(f / "model.safetensors"),
                   r"holds no weights: expected model\.safetensors"),
    # shards and their index
    "shard_lacks_an_indexed_tensor": ("sharded", _in_shard(UP1, _delete(UP1)),
                                      rf"{UP1}: {INDEX} places it in {SHARD}, which does not "
                                      "hold it"),
    "missing_from_shard_and_index": ("sharded", _in_shard(UP1, _delete(UP1), "drop"),
                                     rf"missing tensor {UP1}: not in {INDEX} \(\d+ shards\)"),
    "extra_in_a_shard_only": ("sharded", _in_shard(EXTRA, _add(EXTRA)),
                              rf"{EXTRA}: {SHARD} holds it, but {INDEX} does not list it"),
    "extra_in_shard_and_index": ("sharded", _in_shard(EXTRA, _add(EXTRA), "add"),
                                 rf"unexpected tensor {EXTRA} in {SHARD}"),
    "reshaped_in_a_shard": ("sharded", _in_shard(K2, _transpose(K2)),
                            rf"{K2} in {SHARD}: shape \(64, 32\), expected \(32, 64\)"),
    "shard_file_dropped": ("sharded", _drop_shard,
                           rf"{INDEX} places \S+ (\(and \d+ more\) )?in {SHARD}, which does not "
                           "exist"),
    "index_names_a_tensor_no_shard_has": ("sharded", _index_names(UP9),
                                          rf"{UP9}: {INDEX} places it in {SHARD}, which does "
                                          "not hold it"),
    # .bin
    "bin_missing_tensor": ("bin", lambda f: _edit_tensors(f / "pytorch_model.bin", _delete(UP1)),
                           rf"missing tensor {UP1}: not in pytorch_model\.bin"),
    "bin_pickled_object": ("bin", _bin_with("payload", _Payload()),
                           r"cannot read .*pytorch_model\.bin with torch\.load\(weights_only=True\)"
                           r": .*_Payload.*only a plain dict of tensors loads"),
    "bin_not_a_tensor": ("bin", _bin_with("step", 3),
                         r"step in .*pytorch_model\.bin is not a tensor \(int\)"),
    "bin_not_a_checkpoint": ("bin", _garbage("pytorch_model.bin"),
                             r"cannot read .*pytorch_model\.bin with torch\.load"),
    "bin_shard_dropped": ("bin_sharded",
                          lambda f: os.remove(f / _shard_of(f, UP1, BIN_INDEX)),
                          rf"{BIN_INDEX} places \S+ (\(and \d+ more\) )?in {BIN_SHARD}, which "
                          "does not exist"),
    "bin_shard_lacks_an_indexed_tensor": (
        "bin_sharded", lambda f: _edit_tensors(f / _shard_of(f, UP1, BIN_INDEX), _delete(UP1)),
        rf"{UP1}: {BIN_INDEX} places it in {BIN_SHARD}, which does not hold it"),
}


@pytest.mark.parametrize("kind, damage, message", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_folder_is_refused_by_name_and_nothing_is_written(folders, tmp_path, kind,
                                                                     damage, message):
    folder = tmp_path / kind
    shutil.copytree(folders[kind], folder)
    damage(folder)
    out = tmp_path / "out"
    with pytest.raises((InteropError, UpcycleError), match=message):
        upcycle(str(folder), _moe(), str(out))
    assert not out.exists()


def test_the_command_line_exits_2_naming_the_tensor_and_the_file(folders, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(folders["sharded"], folder)
    _in_shard(K2, _transpose(K2))(folder)
    out = tmp_path / "out"
    # cwd outside the repository: from its root, the folder kernels/ would shadow the installed
    # Hugging Face ``kernels`` package that transformers imports
    done = subprocess.run(
        [sys.executable, "-m", "mm1_moe.cli", "upcycle", "--from", str(folder), "--config", MOE,
         "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "TORCHDYNAMO_DISABLE": "1"})
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("mm1-moe upcycle: "), done.stderr[-2000:]
    assert f"{K2} in {_shard_of(folder, K2)}: shape (64, 32), expected (32, 64)" in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


# --- intact folders: accepted, and upcycled to transformers' own logits ----------------------


def _hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.float()(tokens).logits


def _upcycled_logits(report, config, tokens: torch.Tensor) -> torch.Tensor:
    from mm1_moe.models.builder import build_model_chunks
    from mm1_moe.runtime import initialize, shutdown
    from mm1_moe.upcycle.source import DenseSource, load_source_
    from mm1_moe.upcycle.verify import decoder_logits

    runtime = initialize(config)
    try:
        chunks = build_model_chunks(config, on_cpu=True)
        load_source_(chunks, DenseSource("mm1-moe", report.checkpoint), config)
        logits = decoder_logits(chunks, tokens, runtime.device)
    finally:
        shutdown()
    return logits[..., :config.model.decoder.vocab_size]


def _tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kind", ["sharded", "bin_sharded"])
def test_intact_shards_upcycle_to_the_transformers_logits(folders, model, tmp_path, kind):
    config = _moe()
    report = upcycle(str(folders[kind]), config, str(tmp_path / "out"))
    assert report.preserved, report.summary()
    # every 2nd layer, zero router: measured 0 against logits up to 0.43 (as test_upcycle.py)
    torch.testing.assert_close(_upcycled_logits(report, config, _tokens()),
                               _hf_logits(model, _tokens()), rtol=RTOL, atol=ATOL)


def _variant_folder(tmp_path: Path, model, edit=None) -> Path:
    folder = tmp_path / "variant"
    model.save_pretrained(folder)
    if edit:
        _edit_tensors(folder / "model.safetensors", edit)
    return folder


def _assert_upcycles_to_the_logits_of(hf_model, folder, tmp_path):
    config = _moe()
    report = upcycle(str(folder), config, str(tmp_path / "out"))
    assert report.preserved, report.summary()
    torch.testing.assert_close(_upcycled_logits(report, config, _tokens()),
                               _hf_logits(hf_model, _tokens()), rtol=RTOL, atol=ATOL)


def test_tied_embeddings_without_lm_head_are_accepted(tmp_path):
    tied = _llama(seed=1, tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    folder = _variant_folder(tmp_path, tied)
    assert "lm_head.weight" not in safetensors_torch.load_file(str(folder / "model.safetensors"))
    _assert_upcycles_to_the_logits_of(tied, folder, tmp_path)


def test_tied_embeddings_with_a_different_stored_lm_head_are_refused(tmp_path):
    tied = _llama(seed=1, tie_word_embeddings=True)
    folder = _variant_folder(tmp_path, tied, lambda t: t.__setitem__(
        "lm_head.weight", t["model.embed_tokens.weight"] + 1))
    with pytest.raises(InteropError, match=r"lm_head\.weight in model\.safetensors differs from "
                                           r"model\.embed_tokens\.weight in model\.safetensors, "
                                           r"but config\.json ties them"):
        upcycle(str(folder), _moe(), str(tmp_path / "out"))


def test_old_rotary_buffers_are_ignored(model, tmp_path):
    """Older transformers saved rotary_emb.inv_freq per layer; it is recomputed from rope_theta."""
    def add_buffers(tensors):
        for i in range(4):
            tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    folder = _variant_folder(tmp_path, model, add_buffers)
    report = upcycle(str(folder), _moe(), str(tmp_path / "out"))
    assert report.preserved and report.checkpoint, report.summary()


def test_bf16_weights_are_read_as_stored(tmp_path):
    """A bf16 folder loads its values exactly (bf16 -> fp32 is exact), as from_pretrained(fp32)
    did: the upcycled model matches the bf16 weights run in fp32."""
    bf16 = _llama(seed=2).to(torch.bfloat16)
    folder = _variant_folder(tmp_path, bf16)
    stored = safetensors_torch.load_file(str(folder / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    _assert_upcycles_to_the_logits_of(bf16, folder, tmp_path)


def test_expected_shapes_are_the_transformers_models(model):
    """llama_shapes (what the reader demands) against the state dict transformers builds."""
    assert llama_shapes(_moe()) == {k: tuple(t.shape) for k, t in model.state_dict().items()}


def test_shards_are_read_lazily_tensor_by_tensor_as_transformers_loads_them(folders):
    """The multi-shard safetensors reader checks names, shapes and dtypes from the headers only,
    reads a tensor's data when it is looked up (memory-mapped), and gives what transformers
    loads from the same folder; a bf16 folder stays bf16 in the reader."""
    from mm1_moe.interop.hf_files import LazyTensors, read_hf_weights
    from mm1_moe.interop.llama import llama_tensors_from_files

    weights = read_hf_weights(str(folders["sharded"]))
    assert isinstance(weights.tensors, LazyTensors) and len(set(weights.files.values())) > 2
    checked = llama_tensors_from_files(weights, _moe(), tied=False)
    assert weights.tensors.read == set()  # every check so far read headers only
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(folders["sharded"])).state_dict()
    assert set(checked) == set(loaded)
    for name, tensor in loaded.items():
        assert torch.equal(checked[name], tensor), name
    assert weights.tensors.read == set(loaded)


def test_a_bf16_shard_folder_stays_bf16_until_loaded(tmp_path):
    from mm1_moe.interop.hf_files import read_hf_weights

    folder = tmp_path / "bf16"
    _llama(seed=3).to(torch.bfloat16).save_pretrained(folder, max_shard_size="100KB")
    weights = read_hf_weights(str(folder))
    name = "model.layers.0.mlp.up_proj.weight"
    assert weights.tensors.dtype(name) == torch.bfloat16
    assert weights.tensors[name].dtype == torch.bfloat16
