"""The record every Megatron-core workaround is written as, and the generic snapshot of what it
changes (so a test can prove that ``apply()`` followed by its revert restores the original)."""

from __future__ import annotations

import ast
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, List, Literal, Optional, Tuple

Revert = Callable[[], None]


@dataclass(frozen=True)
class Patch:
    """One workaround for one upstream behaviour.

    ``targets`` are ``module:attribute.path`` strings naming everything ``apply`` rebinds
    (class attributes are read from the class ``__dict__``, so a staticmethod is compared as
    itself). ``check`` reads the installed megatron-core and returns the reasons the workaround
    no longer fits it (empty: upstream still behaves as ``why`` says, and the targets exist).
    ``apply`` installs the workaround and returns the function that undoes exactly that.
    ``probe`` asserts, while applied, the one behaviour the workaround exists for.

    ``kind="setting"``: not a rebinding but a value our own code passes to Megatron (a
    ``TransformerConfig`` field); it has no ``apply`` and its ``probe`` checks the value.
    """

    name: str
    targets: Tuple[str, ...]
    when: Literal["cpu", "always"]
    why: str
    check: Callable[[], List[str]]
    probe: Callable[[], None]
    apply: Optional[Callable[[], Revert]] = None
    kind: Literal["patch", "setting"] = "patch"

    def __post_init__(self) -> None:
        if (self.kind == "patch") != (self.apply is not None):
            raise ValueError(f"{self.name}: a patch has an apply(), a setting has none")


class _Missing:
    """The value of a target that is not bound (a patch may bind a name upstream leaves out)."""

    def __repr__(self) -> str:
        return "<unbound>"


MISSING: Any = _Missing()


def resolve(target: str) -> Tuple[Any, str, Any]:
    """``"pkg.mod:Class.attr"`` -> (owner object, attribute name, current raw value, or
    ``MISSING`` when the attribute is not bound)."""
    module_name, _, path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    if inspect.isclass(owner):
        return owner, name, owner.__dict__.get(name, MISSING)
    return owner, name, getattr(owner, name, MISSING)


def snapshot(patch: Patch) -> Tuple[Any, ...]:
    """The current value of each target (lists copied: filters are lists mutated in place)."""
    values = []
    for target in patch.targets:
        value = resolve(target)[2]
        values.append(list(value) if isinstance(value, list) else value)
    return tuple(values)


def same_snapshot(a: Tuple[Any, ...], b: Tuple[Any, ...]) -> bool:
    """Lists compare by element identity, everything else by identity."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, list) and isinstance(y, list):
            if len(x) != len(y) or any(i is not j for i, j in zip(x, y)):
                return False
        elif x is not y:
            return False
    return True


def rebind(target: str, value: Any) -> Revert:
    """Set ``target`` to ``value``; the returned revert puts the previous value back."""
    owner, name, previous = resolve(target)
    setattr(owner, name, value)

    def revert() -> None:
        if previous is MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, previous)

    return revert


def source_of(target: str) -> str:
    """Source text of a module (``"pkg.mod"``) or of a class/function in it (``"pkg.mod:Cls.f"``),
    read from the module's file: upstream's code even while a patch has rebound the name."""
    module_name, _, path = target.partition(":")
    text = inspect.getsource(importlib.import_module(module_name))
    if not path:
        return text
    body = ast.parse(text).body
    node = None
    for part in path.split("."):
        node = next((n for n in body if isinstance(n, (ast.ClassDef, ast.FunctionDef,
                                                       ast.AsyncFunctionDef))
                     and n.name == part), None)
        if node is None:
            raise AttributeError(f"{target}: no definition of {part!r} in {module_name}")
        body = node.body
    return ast.get_source_segment(text, node)


def missing_text(target: str, *needles: str) -> List[str]:
    """Reasons for each ``needle`` absent from the source of ``target`` (a check's usual form:
    the upstream line that makes the workaround necessary is still there)."""
    try:
        text = source_of(target)
    except (ImportError, AttributeError, KeyError, OSError, TypeError) as err:
        return [f"{target}: cannot read its source ({type(err).__name__}: {err})"]
    return [f"{target} no longer contains {needle!r}" for needle in needles if needle not in text]


def chain(reverts: List[Revert]) -> Revert:
    """One revert that undoes ``reverts`` in reverse order."""

    def revert() -> None:
        for undo in reversed(reverts):
            undo()

    return revert
