"""Loading a checkpoint runs no code from it: every unpickling on the load path is restricted.

A ``dist_checkpointing`` checkpoint is not only tensors. On megatron-core 0.16.1 / torch 2.13,
``dist_checkpointing.load`` unpickles, in this order:

====================  ==================================================  ======================
file                  call site                                           unpickler before
====================  ==================================================  ======================
``common.pt``         megatron ``strategies/common.py``                   ``torch.load`` (torch's
                      ``TorchCommonLoadStrategy.load_common``             default weights_only,
                      (``load_sharded_objects`` too, for other formats)   widened by Megatron's
                                                                          import-time
                                                                          ``add_safe_globals``)
``.metadata``         torch ``distributed/checkpoint/filesystem.py``      ``pickle.load``: any
                      ``FileSystemReader.read_metadata`` (Megatron's      class, any callable
                      ``CachedMetadataFileSystemReader`` inherits it)
``__*.distcp`` bytes  torch ``distributed/checkpoint/default_planner.py`` ``torch.load(...,
                      ``DefaultLoadPlanner.load_bytes`` (Megatron's       weights_only=False)``
                      ``ShardedObject``: modules' ``_extra_state``)
``__*.distcp`` tensor torch ``filesystem.py`` ``FileSystemReader.read_data`` ``torch.load(...,
                                                                          weights_only=True)``
====================  ==================================================  ======================

``restricted_unpickling`` replaces ``torch.load`` and ``pickle.load`` (the module attributes all
four sites call through) while it is open: ``torch.load`` always runs with ``weights_only=True``
and torch's own allow-list only (tensors, storages, dtypes, ``OrderedDict``; Megatron's 16
import-time additions, numpy arrays among them, are set aside for the call), and ``pickle.load``
runs ``_AllowListUnpickler`` (DCP's metadata classes, below). The replacement is process-wide
on purpose: DCP may read on any thread (torch 2.13 reads in the calling thread; gloo's worker
threads only move bytes), and a read on another thread must not escape. Opened twice (nested or
on two threads), the originals come back when the last one closes.

A refused class fails the load with ``CheckpointError`` naming the file and ``module.qualname``;
a refusal is reported even when DCP swallowed it (``read_metadata`` failures are caught and
retried there) or wrapped it (``CheckpointException``, a ``BaseException``, per rank).
"""

from __future__ import annotations

import contextlib
import glob
import io
import mmap as mmap_module
import os
import pickle
import pickletools
import re
import threading
import zipfile
from typing import Any, Iterator, List, Optional

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: refused content, a corrupt file, missing state."""


# --- what a pickle in a checkpoint may reference ------------------------------------------------
# Listed by recording every find_class call while loading real checkpoints (tiny-dense,
# tiny-moe, tiny-mm1-moe; fp32; one process, TP 2, and EP 2 with the distributed optimizer):
# all 16 globals of each .metadata are below, and test_checkpoint_security.py checks a fresh
# save against the list. Each entry: why a legitimate file holds it.
_DCP = "torch.distributed.checkpoint."
METADATA_ALLOWED = {
    _DCP + "metadata.Metadata": "the index of the checkpoint (one per checkpoint)",
    _DCP + "metadata.MetadataIndex": "the key of each stored item",
    _DCP + "metadata.TensorStorageMetadata": "a tensor's global shape and chunks",
    _DCP + "metadata.ChunkStorageMetadata": "a chunk's offsets and sizes",
    _DCP + "metadata.TensorProperties": "a tensor's dtype, layout, memory format",
    _DCP + "metadata._MEM_FORMAT_ENCODING": "TensorProperties' memory-format enum",
    _DCP + "metadata.BytesStorageMetadata": "a byte item (Megatron ShardedObject, _extra_state)",
    _DCP + "metadata.StorageMeta": "checkpoint id and save id",
    _DCP + "filesystem._StorageInfo": "file, offset and length of each item",
    # Megatron 0.16.1 keeps every rank's save plan in the metadata (state_dict_saver.py,
    # ``global_metadata.all_local_plans``) to reuse it on the next save.
    _DCP + "planner.SavePlan": "Metadata.all_local_plans (Megatron)",
    _DCP + "planner.WriteItem": "an item of a SavePlan",
    _DCP + "planner.WriteItemType": "WriteItem's kind enum",
    _DCP + "planner.TensorWriteData": "a tensor item of a SavePlan",
    _DCP + "planner.BytesIOWriteData": "a byte item of a SavePlan (size only)",
    "torch.Size": "tensor shapes",
    "torch.serialization._get_layout": "a layout by name ('torch.strided'), a dict lookup",
    # and every ``torch.<name>`` that is a torch.dtype (torch.float32, torch.bfloat16, ...)
}
# torch.load's weights_only allow-list already covers what our torch files hold (common.pt:
# _rebuild_tensor_v2, OrderedDict, storages; byte items: None; tensors): nothing is added.
TORCH_LOAD_EXTRAS: tuple = ()


def _admitted(module: str, name: str) -> bool:
    if f"{module}.{name}" in METADATA_ALLOWED:
        return True
    return module == "torch" and "." not in name and isinstance(getattr(torch, name, None),
                                                                  torch.dtype)


def _refusal(source: str, what: str) -> str:
    return (f"{source}: refused to unpickle {what}: not on the checkpoint allow-list "
            "(mm1_moe/training/safe_load.py), so nothing from the file was run; the file was "
            "altered, or written by a program other than mm1-moe")


# --- the open scopes and the replaced functions ---------------------------------------------------
class _Scope:
    def __init__(self, checkpoint_dir: str):
        self.checkpoint_dir = checkpoint_dir
        self.refusals: List[str] = []


_LOCK = threading.Lock()           # guards _active and the swap of torch.load / pickle.load
_GLOBALS_LOCK = threading.Lock()   # one restricted torch.load at a time (the safe-globals swap)
_active: List[_Scope] = []
_originals: Optional[tuple] = None  # (torch.load, pickle.load) while a scope is open


def _record(message: str) -> None:
    with _LOCK:
        for scope in _active:
            scope.refusals.append(message)


def _source_name(f: Any) -> str:
    """The file an object is read from: a path, DCP's view into a ``__*.distcp`` file, or the
    BytesIO DCP copies a byte item into (found by its content in the open checkpoints)."""
    if isinstance(f, (str, bytes, os.PathLike)):
        return os.fsdecode(f)
    base = getattr(f, "base_stream", None)  # torch.distributed.checkpoint.utils._ReaderView
    if base is not None and hasattr(base, "name"):
        return f"{os.fsdecode(base.name)} (bytes {f.offset}-{f.offset + f.len})"
    if hasattr(f, "name"):
        return os.fsdecode(f.name)
    if isinstance(f, io.BytesIO):
        return _locate(f.getvalue())
    return repr(f)


def _locate(blob: bytes) -> str:
    with _LOCK:
        folders = [scope.checkpoint_dir for scope in _active]
    for folder in folders:
        for path in sorted(glob.glob(os.path.join(folder, "*.distcp"))):
            if not blob or os.path.getsize(path) == 0:
                continue
            with open(path, "rb") as handle, mmap_module.mmap(
                    handle.fileno(), 0, access=mmap_module.ACCESS_READ) as data:
                at = data.find(blob)
            if at >= 0:
                return f"{path} (object at bytes {at}-{at + len(blob)})"
    return f"an object in a data file (__*.distcp) of {' or '.join(folders)}"


class _AllowListUnpickler(pickle.Unpickler):
    """Admits the classes of ``METADATA_ALLOWED`` and torch dtypes; refuses any other global."""

    def __init__(self, file, **kwargs):
        super().__init__(file, **kwargs)
        self.file = file

    def find_class(self, module: str, name: str):
        if not _admitted(module, name):
            message = _refusal(_source_name(self.file), f"{module}.{name}")
            _record(message)
            raise CheckpointError(message)
        return super().find_class(module, name)


def _restricted_pickle_load(file, **kwargs):
    """``pickle.load`` as DCP's ``read_metadata`` calls it, with ``_AllowListUnpickler``."""
    try:
        return _AllowListUnpickler(file, **kwargs).load()
    except CheckpointError:
        raise
    except Exception as err:  # a truncated or garbled file: name it
        raise CheckpointError(f"{_source_name(file)}: cannot read it ({_one_line(err)})") from err


_TORCH_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
               "BINSTRING", "STRING"}


def _pickle_globals(data: bytes) -> List[str]:
    """The globals a pickle names (GLOBAL, and STACK_GLOBAL after two strings, memo included),
    read from its opcodes without running it. Best effort, for messages only."""
    names: List[str] = []
    strings: List[Optional[str]] = []
    memo: dict = {}
    stream = io.BytesIO(data)
    try:
        while stream.tell() < len(data):  # a legacy torch file holds several pickles
            for op, arg, _ in pickletools.genops(stream):
                if op.name in _STRING_OPS:
                    strings.append(arg)
                elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                    strings.append(memo.get(arg))
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT", "MEMOIZE"):
                    memo[len(memo) if op.name == "MEMOIZE" else arg] = \
                        strings[-1] if strings else None
                elif op.name in ("FRAME", "PROTO"):
                    pass
                else:
                    if op.name == "GLOBAL":
                        names.append(arg.replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(strings) >= 2 \
                            and None not in strings[-2:]:
                        names.append(f"{strings[-2]}.{strings[-1]}")
                    strings.append(None)  # the top of the stack is no longer a string
    except Exception:  # noqa: BLE001 - a garbled pickle: name what was found before it
        pass
    return names


def _pickle_bytes(f: Any) -> bytes:
    """The pickle of a torch file (a path or a stream; zip format: its data.pkl)."""
    try:
        if isinstance(f, (str, bytes, os.PathLike)):
            with open(f, "rb") as handle:
                raw = handle.read()
        else:
            f.seek(0)
            raw = f.read()
        if zipfile.is_zipfile(io.BytesIO(raw)):
            with zipfile.ZipFile(io.BytesIO(raw)) as archive:
                return archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
        return raw
    except Exception:  # noqa: BLE001 - for a message only
        return b""


def _torch_failure(err: Exception, f: Any) -> tuple:
    """(the global torch's weights-only unpickler refused, or None; the reason in a line)."""
    from torch import _weights_only_unpickler

    text = str(err)
    if "Weights only load failed" not in text:
        return None, _one_line(err)
    found = _TORCH_GLOBAL.search(text)
    if found:  # torch prints builtins.exec as 'exec'
        name = found.group(1)
        return (name if "." in name else f"builtins.{name}"), ""
    detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
    reason = f"torch's weights-only unpickler: {detail[0] if detail else '?'}"
    # torch's unpickler has no STACK_GLOBAL (pickle protocol 4+): it stops at 'Unsupported
    # operand 147' before it sees the class, so the class is named from the opcodes.
    allowed = set(_weights_only_unpickler._get_allowed_globals()) | {
        f"{g.__module__}.{g.__qualname__}" for g in TORCH_LOAD_EXTRAS}
    named = [g for g in _pickle_globals(_pickle_bytes(f)) if g not in allowed]
    return (named[0] if named else None), reason


def _restricted_torch_load(f, map_location=None, pickle_module=None, *, weights_only=None,
                           mmap=None, **kwargs):
    """``torch.load`` with ``weights_only=True`` whatever the caller asked, and torch's own
    allow-list plus ``TORCH_LOAD_EXTRAS`` only."""
    if pickle_module is not None:
        raise CheckpointError(f"{_source_name(f)}: a custom pickle module was asked for; refused")
    load = _originals[0] if _originals else torch.load
    with _GLOBALS_LOCK:
        registered = torch.serialization.get_safe_globals()
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(list(TORCH_LOAD_EXTRAS))
        try:
            return load(f, map_location=map_location, weights_only=True, mmap=mmap, **kwargs)
        except FileNotFoundError:
            raise  # Megatron's loaders look for a fallback file on this one
        except Exception as err:
            refused, reason = _torch_failure(err, f)
            source = _source_name(f)  # only now: for a byte item it searches the files
            if refused is None:
                raise CheckpointError(f"{source}: cannot read it ({reason})") from err
            message = _refusal(source, refused)
            _record(message)
            raise CheckpointError(message) from err
        finally:
            torch.serialization.clear_safe_globals()
            torch.serialization.add_safe_globals(registered)


def _install(scope: _Scope) -> None:
    global _originals
    with _LOCK:
        if not _active:
            _originals = (torch.load, pickle.load)
            torch.load = _restricted_torch_load
            pickle.load = _restricted_pickle_load
        _active.append(scope)


def _uninstall(scope: _Scope) -> None:
    global _originals
    with _LOCK:
        _active.remove(scope)
        if not _active and _originals is not None:
            torch.load, pickle.load = _originals
            _originals = None


# --- the context manager and the reason behind a failure -----------------------------------------
def _one_line(err: BaseException, limit: int = 400) -> str:
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def failure_cause(err: BaseException) -> str:
    """One line saying why a load failed. DCP's ``CheckpointException`` starts with
    'CheckpointException ranks:dict_keys([0])'; the reason is the first failing rank's
    exception, which this unwraps (recursively)."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        rank = min(failures)
        inner = failures[rank]
        inner = inner[0] if isinstance(inner, tuple) else inner
        more = len(failures) - 1
        others = f" (and {more} more rank{'s' if more > 1 else ''})" if more else ""
        return f"rank {rank}{others}: {failure_cause(inner)}"
    if isinstance(err, CheckpointError):
        return str(err).strip().splitlines()[0] if str(err).strip() else "CheckpointError"
    return _one_line(err)


@contextlib.contextmanager
def restricted_unpickling(checkpoint_dir: str) -> Iterator[None]:
    """Open around ``dist_checkpointing.load(..., checkpoint_dir)``: restricted unpickling (see
    the module docstring) while it runs; a refusal, or DCP's ``CheckpointException``, leaves as
    ``CheckpointError`` with the reason. A refusal fails the load even if the loader caught it."""
    from torch.distributed.checkpoint.api import CheckpointException

    scope = _Scope(os.fspath(checkpoint_dir))
    _install(scope)
    try:
        try:
            yield
        finally:
            _uninstall(scope)
    except (Exception, CheckpointException) as err:
        if scope.refusals:
            raise CheckpointError(scope.refusals[0]) from err
        if isinstance(err, CheckpointException):
            raise CheckpointError(f"{scope.checkpoint_dir}: {failure_cause(err)}") from err
        raise
    if scope.refusals:
        raise CheckpointError(scope.refusals[0])
