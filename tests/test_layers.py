"""The package's layers (CONTRIBUTING.md, "Where things are"): no module imports from a layer
below its own, so the math never depends on the modules, the modules never on an integration,
and so on up to the commands."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Top-level module or subpackage of nystromer → layer; a module may import its own layer, the
# layers before it, and the utilities (layer 0).
LAYERS = {
    **dict.fromkeys(
        ["_io", "_markdown", "_machine", "_args", "_checks", "_torchutil", "_version"], 0
    ),
    **dict.fromkeys(["functional", "reference", "_cpu", "_conv", "_sdpa", "options"], 1),
    **dict.fromkeys(["attention", "attention_map"], 2),
    **dict.fromkeys(["hf", "patching", "conversion", "calibration", "models", "compat"], 3),
    # The applications stack too: the task-agnostic training loop, the LRA tasks trained with
    # it, the benchmarks (which measure LRA models), and distillation (whose eval-long reports
    # through the benchmarks' measuring tools).
    "train": 4,
    "lra": 5,
    "bench": 6,
    "distill": 7,
    **dict.fromkeys(["cli", "__main__", "__init__"], 8),
}


def _unit(module: str) -> str:
    """nystromer.a.b → a (the package's own __init__ → __init__)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The nystromer modules a file imports (``from . import x`` counts as module ``.x``)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("nystromer")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("nystromer"):
                continue
            if node.module is None or target == "nystromer":
                # ``from . import x`` or ``from nystromer import x``: x may be a submodule.
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    top = SRC / Path(*sub.split("."))
                    exists = top.with_suffix(".py").exists() or top.is_dir()
                    found.add(sub if exists else target)
            else:
                found.add(target)
    return found


def _files() -> list[Path]:
    return sorted((SRC / "nystromer").rglob("*.py"))


def test_every_unit_has_a_layer():
    units = {_unit(_module_name(p)) for p in _files()}
    assert units <= set(LAYERS), f"give these a layer in LAYERS: {sorted(units - set(LAYERS))}"


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_imports_from_a_lower_layer(path: Path):
    own = LAYERS[_unit(_module_name(path))]
    upward = {
        target
        for target in _imports(path)
        if LAYERS[_unit(target)] > own and LAYERS[_unit(target)] != 0
    }
    assert not upward, f"{path.relative_to(SRC)} (layer {own}) imports {sorted(upward)}"
