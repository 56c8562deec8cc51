"""What autograd keeps for the backward, measured: the bytes of the distinct storages saved for
backward during a forward, attributed to the innermost tracked module that was running.

This is the ground truth ``mm1_moe.info``'s activation formulas are checked against
(tests/unit/test_activation_memory.py). Rules, so the count is what a GPU would hold:

- A storage counts once, however many ops save views of it (a [T, 2F] fc1 output read through
  two halves is 2F per token, not 4F), and it counts whole: a saved view keeps its storage alive.
- Parameters are weights, not activations: storages of ``model.parameters()`` are left out.
- A storage counts for the first tracked module that saved it (the next layer's RMSNorm saves
  the residual stream this layer produced: it is charged to the layer that keeps it).
- Saves made outside every tracked module count under ``OUTSIDE`` (with full recomputation,
  Megatron's ``CheckpointFunction`` saves each group's input from the transformer block).

``SavedBytes`` also counts, in ``rerun``, what is saved while a backward runs inside it: the
forwards that recomputation reruns. Those tensors live only while their group's backward runs,
so the peak they add is the largest group's share, not the sum (``rerun_peak``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Mapping, Sequence

import torch

OUTSIDE = "outside"


def decoder_layer_scopes(model: torch.nn.Module, config) -> Dict[str, List[torch.nn.Module]]:
    """{"dense": [...], "moe": [...]}: the decoder layers of ``model`` (one chunk) by FFN kind,
    from each layer's global index (Megatron's 1-based ``layer_number``)."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    scopes: Dict[str, List[torch.nn.Module]] = {"dense": [], "moe": []}
    for module in model.modules():
        if isinstance(module, TransformerLayer):
            moe = config.model.decoder.is_moe_layer(module.layer_number - 1)
            scopes["moe" if moe else "dense"].append(module)
    return scopes


class SavedBytes:
    """Context manager: ``forward`` bytes per scope while active; ``rerun`` likewise for saves made
    by a backward run inside it (``backward()``). ``scopes`` maps a name to a module; several
    modules may share a name (their bytes add)."""

    def __init__(self, model: torch.nn.Module, scopes: Mapping[str, List[torch.nn.Module]]):
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self._scopes = scopes
        self._stack: List[str] = []
        self._seen: Dict[int, torch.Tensor] = {}  # holds each storage so no address is reused
        self._in_backward = False
        self._rerun_group: List[int] = [0]
        self.forward: Dict[str, int] = defaultdict(int)
        self.rerun: Dict[str, int] = defaultdict(int)
        self.rerun_groups: List[int] = []
        self._handles: list = []
        self._hooks = None

    # --- attribution -------------------------------------------------------------------------
    def _enter(self, name: str):
        def pre(module, args, kwargs=None):
            self._stack.append(name)
        return pre

    def _leave(self, module, args, output):
        self._stack.pop()

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. sparse)
            return tensor
        ptr = storage.data_ptr()
        if ptr in self._params or ptr in self._seen or storage.nbytes() == 0:
            return tensor
        self._seen[ptr] = tensor
        scope = self._stack[-1] if self._stack else OUTSIDE
        if self._in_backward:
            self.rerun[scope] += storage.nbytes()
            self._rerun_group[-1] += storage.nbytes()
        else:
            self.forward[scope] += storage.nbytes()
        return tensor

    # --- context -------------------------------------------------------------------------------
    def __enter__(self) -> "SavedBytes":
        for name, modules in self._scopes.items():
            for module in modules:
                self._handles.append(module.register_forward_pre_hook(self._enter(name)))
                self._handles.append(module.register_forward_hook(self._leave))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()

    def backward(self, loss: torch.Tensor, group_starts: Sequence[torch.nn.Module] = ()) -> None:
        """``loss.backward()`` with recomputed forwards counted in ``rerun``. ``group_starts``: the
        first module of each recomputed group; its forward in the backward starts a new group
        (``rerun_groups`` then holds each group's bytes)."""
        def new_group(module, args):
            if self._rerun_group[-1]:
                self._rerun_group.append(0)
        handles = [m.register_forward_pre_hook(new_group) for m in group_starts]
        self._in_backward = True
        try:
            loss.backward()
        finally:
            self._in_backward = False
            for handle in handles:
                handle.remove()
        self.rerun_groups = [g for g in self._rerun_group if g]

    @property
    def rerun_peak(self) -> int:
        """Bytes of the largest recomputed group (0 without recomputation)."""
        return max(self.rerun_groups, default=0)

    def total(self) -> int:
        return sum(self.forward.values())
