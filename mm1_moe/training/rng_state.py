"""Each rank's RNG states as JSON: a checkpoint stores them without pickle, bit for bit.

One file per rank, addressed by its (pipeline, tensor, data)-parallel rank as Megatron-LM
addresses RNG state: ``<checkpoint>/rng/pp0_tp1_dp0.json``. It holds

- ``python``: ``random.getstate()`` = version 3, 625 words (624 of MT19937 state + position),
  ``gauss_next`` (null or a float);
- ``numpy``: ``np.random.get_state()`` = 'MT19937', 624 uint32 words, position, has_gauss,
  cached_gaussian;
- ``torch``: the CPU generator's state (5056 bytes on torch 2.13), as hex;
- ``tracker``: Megatron's ``get_cuda_rng_tracker().get_states()``, name -> state bytes as hex
  (CPU generator states on CPU runs, Philox states on CUDA);
- ``cuda``: ``torch.cuda.get_rng_state()`` as hex, on CUDA machines only.

JSON floats are written with ``repr`` (shortest round-trip), so ``gauss_next`` and
``cached_gaussian`` come back exactly. ``decode`` checks every field before anything is set.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
import torch

from .safe_load import CheckpointError

FOLDER = "rng"


def rank_file(checkpoint_dir: str) -> str:
    """This rank's RNG file in ``checkpoint_dir``."""
    from megatron.core import parallel_state as ps

    name = (f"pp{ps.get_pipeline_model_parallel_rank()}_tp{ps.get_tensor_model_parallel_rank()}"
            f"_dp{ps.get_data_parallel_rank()}.json")
    return os.path.join(checkpoint_dir, FOLDER, name)


def _hex(state: torch.Tensor) -> str:
    return state.detach().cpu().contiguous().numpy().tobytes().hex()


def capture() -> Dict[str, Any]:
    """This process's RNG states as a JSON-compatible dict (see the module docstring)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    version, words, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: Dict[str, Any] = {
        "python": {"version": version, "state": list(words), "gauss_next": gauss_next},
        "numpy": {"bit_generator": name, "key": [int(k) for k in keys], "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": _hex(torch.get_rng_state()),
        "tracker": {n: _hex(s) for n, s in get_cuda_rng_tracker().get_states().items()}}
    if torch.cuda.is_available():
        state["cuda"] = _hex(torch.cuda.get_rng_state())
    return state


def write(checkpoint_dir: str, states: Dict[str, Any]) -> None:
    """``states`` (from ``capture()``) as this rank's file in ``checkpoint_dir``."""
    path = rank_file(checkpoint_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(states, handle)


@dataclass(frozen=True)
class RngStates:
    python: tuple
    numpy: tuple
    torch: torch.Tensor
    tracker: Dict[str, torch.Tensor]
    cuda: Optional[torch.Tensor]


def _check(ok: bool, path: str, field: str, why: str) -> None:
    if not ok:
        raise CheckpointError(f"{path}: {field} {why}")


def _words(value: Any, n: int, path: str, field: str) -> list:
    _check(isinstance(value, list) and len(value) == n and
           all(type(v) is int and 0 <= v < 2 ** 32 for v in value),
           path, field, f"is not a list of {n} 32-bit words")
    return value


def _bytes(value: Any, like: torch.Tensor, path: str, field: str) -> torch.Tensor:
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else None
    except ValueError:
        raw = None
    _check(raw is not None and len(raw) == like.numel(), path, field,
           f"is not {like.numel()} bytes as hex (this machine's generator state size)")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def _float(value: Any, path: str, field: str) -> float:
    _check(type(value) in (int, float), path, field, "is not a number")
    return float(value)


def decode(state: Any, path: str) -> RngStates:
    """Validated states from ``state`` (parsed JSON); raises CheckpointError naming the field."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    _check(isinstance(state, dict), path, "the file", "is not a JSON object")
    py, npy = state.get("python"), state.get("numpy")
    _check(isinstance(py, dict) and py.get("version") == 3, path, "python", "is not version 3")
    gauss = py.get("gauss_next")
    python = (3, tuple(_words(py.get("state"), 625, path, "python.state")),
              None if gauss is None else _float(gauss, path, "python.gauss_next"))
    _check(isinstance(npy, dict) and npy.get("bit_generator") == "MT19937", path, "numpy",
           "is not an MT19937 state")
    _check(type(npy.get("pos")) is int and npy.get("has_gauss") in (0, 1), path, "numpy",
           "has no integer pos / has_gauss")
    numpy = ("MT19937", np.asarray(_words(npy.get("key"), 624, path, "numpy.key"), np.uint32),
             npy["pos"], npy["has_gauss"], _float(npy.get("cached_gaussian"), path,
                                                  "numpy.cached_gaussian"))
    current = get_cuda_rng_tracker().get_states()
    saved = state.get("tracker")
    _check(isinstance(saved, dict) and sorted(saved) == sorted(current), path, "tracker",
           f"does not hold the states {sorted(current)} of this run")
    tracker = {n: _bytes(saved[n], current[n], path, f"tracker.{n}") for n in current}
    cuda = None
    if torch.cuda.is_available() and "cuda" in state:
        cuda = _bytes(state["cuda"], torch.cuda.get_rng_state(), path, "cuda")
    return RngStates(python, numpy, _bytes(state.get("torch"), torch.get_rng_state(), path,
                                           "torch"), tracker, cuda)


def read(checkpoint_dir: str) -> RngStates:
    """This rank's states from ``checkpoint_dir`` (parsed as JSON, checked; nothing set)."""
    path = rank_file(checkpoint_dir)
    try:
        with open(path, encoding="utf-8") as handle:
            state = json.load(handle)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read this rank's RNG states "
                              f"({type(err).__name__}: {err})") from err
    return decode(state, path)


def restore(states: RngStates) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(states.python)
    np.random.set_state(states.numpy)
    torch.set_rng_state(states.torch)
    get_cuda_rng_tracker().set_states(dict(states.tracker))
    if states.cuda is not None:
        torch.cuda.set_rng_state(states.cuda)
