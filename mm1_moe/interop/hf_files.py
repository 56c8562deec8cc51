"""A Hugging Face model folder's weight files, read strictly (never through ``from_pretrained``).

``from_pretrained`` fills a tensor the files lack with its random init and drops one the model
does not know, and only logs both; upcycling a Llama folder with a tensor missing then compared
the MoE model with those same random weights, reported "preserved", and wrote a checkpoint whose
logits were off by up to 3.2 (13 of the 21 damaged folders of tests/unit/test_hf_strict.py went
through like that; most of the rest ended in a transformers traceback). Here every tensor comes
from a file, and the files must agree with each other. Layouts, in the order ``from_pretrained``
prefers them:

  model.safetensors                  one file
  model.safetensors.index.json       {"weight_map": {tensor: shard}} and the shards it names
  pytorch_model.bin                  torch.load(weights_only=True): a plain dict of tensors
  pytorch_model.bin.index.json       the same, sharded

A shard the index names that is absent, a tensor the index places in a shard that lacks it, a
tensor a shard holds that the index does not place there (or a tensor in two shards), a file
that does not parse and a value that is not a tensor each raise ``InteropError`` naming the
tensor and the file. Which tensors a model needs, and their shapes, is the converter's business
(``llama.py``); ``HFWeights.files`` lets its messages name the file as well. Tensors keep the
dtype they were stored in (a bf16 folder stays bf16 until it is copied into the model).

Reading is lazy, so a model larger than one process's memory can be converted: the checks above
and the converter's shape and dtype checks read only the files' headers (``HFWeights.shape_of``,
``dtype_of``), and a tensor's data is read when it is used (safetensors: one tensor at a time
from the memory-mapped file; .bin: ``torch.load(mmap=True)``, which maps the file). A rank that
loads its shards therefore reads the tensors of its own layers, one at a time, and nothing else.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from typing import Dict, Iterator, List, Mapping, Set, Tuple

import torch

from .llama import InteropError

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                       "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


class LazyTensors(Mapping):
    """Name -> tensor of safetensors files, each tensor read from its (memory-mapped) file when
    it is looked up and not kept; ``shape``/``dtype`` read the header only."""

    def __init__(self) -> None:
        self._handles: Dict[str, object] = {}  # tensor name -> safe_open handle
        self._aliases: Dict[str, str] = {}
        self.read: Set[str] = set()
        """The tensors whose data was read so far (what a rank touched)."""

    def add_file(self, handle) -> List[str]:
        names = list(handle.keys())
        for name in names:
            self._handles[name] = handle
        return names

    def alias(self, name: str, existing: str) -> None:
        """``name`` reads as ``existing`` (a tied output layer)."""
        self._aliases[name] = existing

    def _source(self, name: str) -> Tuple[object, str]:
        real = self._aliases.get(name, name)
        if real not in self._handles:
            raise KeyError(name)
        return self._handles[real], real

    def __getitem__(self, name: str) -> torch.Tensor:
        handle, real = self._source(name)
        self.read.add(real)
        return handle.get_tensor(real)

    def __iter__(self) -> Iterator[str]:
        yield from self._handles
        yield from (a for a in self._aliases if a not in self._handles)

    def __len__(self) -> int:
        return len(set(self._handles) | set(self._aliases))

    def __contains__(self, name: object) -> bool:
        return name in self._handles or name in self._aliases

    def shape(self, name: str) -> Tuple[int, ...]:
        handle, real = self._source(name)
        return tuple(handle.get_slice(real).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        handle, real = self._source(name)
        kind = handle.get_slice(real).get_dtype()
        if kind not in _SAFETENSORS_DTYPES:
            raise InteropError(f"{name}: safetensors dtype {kind} is not supported")
        return _SAFETENSORS_DTYPES[kind]


def shape_of(tensors: Mapping[str, torch.Tensor], name: str) -> Tuple[int, ...]:
    """A tensor's shape, from the header when the mapping is lazy."""
    if isinstance(tensors, LazyTensors):
        return tensors.shape(name)
    return tuple(tensors[name].shape)


def dtype_of(tensors: Mapping[str, torch.Tensor], name: str) -> torch.dtype:
    if isinstance(tensors, LazyTensors):
        return tensors.dtype(name)
    return tensors[name].dtype


@dataclass(frozen=True)
class HFWeights:
    folder: str
    layout: str
    """The file that says where the tensors are: a single weights file or a shard index."""
    tensors: Mapping[str, torch.Tensor]
    files: Dict[str, str]
    """Tensor name -> the file (relative to ``folder``) it was read from."""

    def file_of(self, name: str) -> str:
        return self.files.get(name, "?")

    def searched(self) -> str:
        """Where a tensor that is not here was looked for: ``model.safetensors``, or
        ``model.safetensors.index.json (5 shards)``."""
        if not self.layout.endswith(".index.json"):
            return self.layout
        return f"{self.layout} ({len(set(self.files.values()))} shards)"


def weight_layout(folder: str) -> Tuple[str, bool]:
    """(file name, whether it is a shard index) of the folder's weights. Two of one format (a
    single file beside an index) is an error: one of them is stale, and which is unknowable."""
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (BIN, BIN_INDEX)):
        present = [n for n in (single, index) if os.path.isfile(os.path.join(folder, n))]
        if len(present) == 2:
            raise InteropError(f"{folder} holds both {single} and {index}: remove the stale one")
        if present:
            return present[0], present[0] == index
    raise InteropError(f"{folder} holds no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, "
                       f"{BIN} or {BIN_INDEX}")


def read_hf_weights(folder: str) -> HFWeights:
    """Every tensor of the folder's weight files, lazily (see the module docstring for the
    checks, which read the files' headers only)."""
    name, sharded = weight_layout(folder)
    if not sharded:
        tensors = _read_file(folder, name)
        return HFWeights(folder, name, tensors, {t: name for t in tensors})
    weight_map = _read_index(folder, name)
    lazy = name == SAFETENSORS_INDEX
    tensors: Mapping[str, torch.Tensor] = LazyTensors() if lazy else {}
    files: Dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        shard_tensors = _read_file(folder, shard)
        for tensor_name in list(shard_tensors):
            placed = weight_map.get(tensor_name)
            if placed != shard:
                where = f"places it in {placed}" if placed else "does not list it"
                raise InteropError(f"{tensor_name}: {shard} holds it, but {name} {where} "
                                   f"(in {folder})")
            files[tensor_name] = shard
        if lazy:
            tensors._handles.update(shard_tensors._handles)
        else:
            tensors.update(shard_tensors)
    lacking = sorted(set(weight_map) - set(files))
    if lacking:
        raise InteropError(f"{_some(lacking)}: {name} places it in {weight_map[lacking[0]]}, "
                           f"which does not hold it (in {folder})")
    return HFWeights(folder, name, tensors, files)


def _read_index(folder: str, name: str) -> Dict[str, str]:
    """The index's ``weight_map``; a shard it names must exist."""
    path = os.path.join(folder, name)
    try:
        with open(path, "r", encoding="utf-8") as handle:
            weight_map = json.load(handle)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise InteropError(f"{path}: not a shard index with a weight_map ({err!r})") from err
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise InteropError(f"{path}: weight_map must map tensor names to file names")
    by_shard: Dict[str, List[str]] = {}
    for tensor_name, shard in sorted(weight_map.items()):
        by_shard.setdefault(shard, []).append(tensor_name)
    for shard, names in sorted(by_shard.items()):
        if not os.path.isfile(os.path.join(folder, shard)):
            raise InteropError(f"{name} places {_some(names)} in {shard}, which does not exist "
                               f"in {folder}")
    return weight_map


def _read_file(folder: str, name: str) -> Mapping[str, torch.Tensor]:
    path = os.path.join(folder, name)
    if not name.endswith(".safetensors"):
        return _torch_load(path)
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as err:
        raise InteropError(f"reading {path} needs the safetensors package: pip install "
                           "'mm1-moe[hf]'") from err
    try:
        handle = safe_open(path, framework="pt", device="cpu")
        tensors = LazyTensors()
        tensors.add_file(handle)
        return tensors
    except (SafetensorError, OSError) as err:
        raise InteropError(f"cannot read {path}: {err}") from err


def _torch_load(path: str) -> Dict[str, torch.Tensor]:
    """A .bin file, without running code: weights_only refuses any pickled object but tensors
    and plain containers (a custom class, a function), where a full unpickle would run it."""
    try:
        try:  # memory-mapped: pages are read when a tensor is used (zip-format files)
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise InteropError(f"cannot read {path} with torch.load(weights_only=True): "
                           f"{_first_reason(err)}; only a plain dict of tensors loads (convert "
                           "the folder to safetensors)") from err
    if not isinstance(state, dict):
        raise InteropError(f"{path} holds no dict of tensors ({type(state).__name__})")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise InteropError(f"{key} in {path} is not a tensor ({type(value).__name__})")
    return state


def _first_reason(err: BaseException) -> str:
    """torch's weights_only message is ~1,000 characters, most of it advice on allowlisting the
    class (which would defeat the point); keep the sentence that says what was refused
    (``Unsupported global: GLOBAL __main__.Thing was not an allowed global by default``)."""
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0].split(". ")[0].rstrip(".") if lines else type(err).__name__


def _some(names: List[str]) -> str:
    """``a`` or ``a (and 3 more)``: one name to act on and how many share the problem."""
    return names[0] + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")
