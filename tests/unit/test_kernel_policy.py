"""The kernels' layering and policy, read from the source (AST only: nothing is imported, no GPU).

  (a) kernel files share helpers under public names: no ``from .x import _y`` between them (nor
      from ``mm1_moe/``); a module name may start with ``_`` (``_common``), an imported name not;
  (b) nothing under ``mm1_moe/`` imports ``triton``: modules call the kernels' plain functions;
  (c) nothing under ``kernels/`` imports ``mm1_moe``: a kernel never knows about the model;
  (d) the kernel policy is written once, in ``kernels/_common.py``: the accumulate dtype, the dot
      precision and the interpreter-or-GPU switch (``kernel_dtypes``, ``acc_dtype``,
      ``use_interpreter_tiles``).

``kernels/`` is installed as ``mm1_moe.kernels`` (setup.py's package_dir), so its relative
imports are resolved against that name.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest

REPO = Path(__file__).resolve().parents[2]
KERNELS = REPO / "kernels"
POLICY = KERNELS / "_common.py"


def _files(root: Path) -> List[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(REPO).as_posix()}:{node.lineno}"


def _tree(path: Path, source: Optional[str] = None) -> ast.Module:
    if source is None:
        source = path.read_text(encoding="utf-8")
    return ast.parse(source, filename=str(path))


def _installed_package(path: Path) -> List[str]:
    parts = list(path.relative_to(REPO).parent.parts)
    return ["mm1_moe", *parts] if parts[0] == "kernels" else parts


def _imports(path: Path, source: Optional[str] = None
             ) -> Iterator[Tuple[ast.AST, int, str, List[str]]]:
    """(node, level, module, imported names) for every import of the file, lazy ones included;
    ``module`` is absolute, relative imports resolved against the installed package name."""
    package = _installed_package(path)
    for node in ast.walk(_tree(path, source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, 0, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield node, node.level, module, [a.name for a in node.names]


def _is_kernel_module(module: str) -> bool:
    return any(module == root or module.startswith(root + ".")
               for root in ("mm1_moe.kernels", "kernels"))


def _is_submodule(module: str, name: str) -> bool:
    """``from . import _common`` imports a module, which may be named with an underscore."""
    parts = module.split(".")
    rel = parts[2:] if parts[:2] == ["mm1_moe", "kernels"] else parts[1:]
    folder = KERNELS.joinpath(*rel, name)
    return folder.with_suffix(".py").is_file() or (folder / "__init__.py").is_file()


def _private_imports(path: Path, source: Optional[str] = None) -> List[str]:
    return [f"{_where(path, node)} imports {name} from {module}"
            for node, _, module, names in _imports(path, source) if _is_kernel_module(module)
            for name in names if name.startswith("_") and not _is_submodule(module, name)]


def test_no_private_names_imported_from_kernel_files():
    bad = [hit for path in _files(KERNELS) + _files(REPO / "mm1_moe")
           for hit in _private_imports(path)]
    assert not bad, ("a helper two kernel files share gets a public name (in a shared module, "
                     "e.g. kernels/_common.py or kernels/attention_tiles.py):\n" + "\n".join(bad))


def test_modules_never_import_triton():
    bad = [f"{_where(path, node)} imports {module}"
           for path in _files(REPO / "mm1_moe") for node, level, module, _ in _imports(path)
           if level == 0 and (module == "triton" or module.startswith("triton."))]
    assert not bad, ("modules under mm1_moe/ call the kernels' plain functions "
                     "(mm1_moe.kernels.<op>), never triton:\n" + "\n".join(bad))


def test_kernels_never_import_mm1_moe():
    bad = [f"{_where(path, node)} imports {module}"
           for path in _files(KERNELS) for node, level, module, _ in _imports(path)
           if (module == "mm1_moe" or module.startswith("mm1_moe."))
           and (level == 0 or not _is_kernel_module(module))]
    assert not bad, ("kernels/ stands alone (installed as mm1_moe.kernels, importable as a "
                     "top-level package too): it imports itself by relative imports and nothing "
                     "of mm1_moe:\n" + "\n".join(bad))


def _policy_copies(path: Path) -> Iterator[str]:
    for node in ast.walk(_tree(path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                key in node.name for key in ("acc_dtype", "kernel_dtypes", "interpreter_tiles")):
            yield f"{_where(path, node)} defines {node.name}"
        elif isinstance(node, ast.IfExp) and any(
                isinstance(side, ast.Attribute) and side.attr in ("float32", "float64")
                for side in (node.body, node.orelse)):
            yield f"{_where(path, node)} picks a float dtype inline (use acc_dtype/kernel_dtypes)"
        elif isinstance(node, ast.Constant) and node.value == "ieee":
            yield f"{_where(path, node)} states the dot precision (use kernel_dtypes)"
        elif (isinstance(node, ast.Name) and node.id == "INTERPRET"
              and path.name != "compile_check.py"):  # it picks where to compile, not tiles
            yield f"{_where(path, node)} reads INTERPRET (use use_interpreter_tiles/kernel_dtypes)"
        elif isinstance(node, ast.Compare) and any(
                isinstance(c, ast.Constant) and c.value == "cuda"
                for c in [node.left, *node.comparators]):
            yield f"{_where(path, node)} tests the device for 'cuda' (use use_interpreter_tiles)"


def test_kernel_policy_is_written_once():
    # The references (kernels/reference/) are independent torch oracles: they state the
    # accumulate dtype themselves, on purpose.
    files = [p for p in _files(KERNELS) if p != POLICY and "reference" not in p.parts]
    bad = [hit for path in files for hit in _policy_copies(path)]
    assert not bad, "kernel policy lives in kernels/_common.py only:\n" + "\n".join(bad)
    assert len(list(_policy_copies(POLICY))) > 0  # the detector still sees the rule it guards


@pytest.mark.parametrize("path, source, caught", [
    ("kernels/experts.py", "from .grouped_gemm import _mm_mainloop", True),
    ("kernels/reference/dispatch.py", "from ..dispatch import _row_blocks", True),
    ("mm1_moe/moe/backend.py", "from ..kernels.attention import _fwd_tiles", True),
    ("kernels/attention.py", "from .attention_tiles import load_tile as _load", False),
    ("kernels/dispatch.py", "from . import _common", False),
    ("kernels/dispatch.py", "from ._common import next_pow2", False),
])
def test_private_import_rule_on_examples(path, source, caught):
    assert bool(_private_imports(REPO / path, source)) == caught
