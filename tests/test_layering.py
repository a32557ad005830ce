"""Dependencies run one way (DESIGN.md): every import between dcmkd's packages, lazy imports
inside functions included, goes from a higher layer to a lower one; no circle."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "dcmkd"

#: lowest first; a package may import only packages of lower layers (its own modules aside)
LAYERS = [
    {"version", "registry", "yamlio", "warn", "progress", "weights"},
    {"options"},   # the typed config fields (dcmkd.options)
    {"run_folder", "experiment"},
    {"models", "losses", "data"},
    {"heads", "metrics"},
    {"methods"},
    {"tasks"},
    {"engine"},
    {"report"},
    {"recipes"},
    {"cli"},
    {"__main__", "dcmkd"},   # dcmkd: the package's __init__ (the public API)
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "dcmkd"


def _imports() -> list[tuple[str, str, str]]:
    """(importing module, imported module, where) for every dcmkd import in the source."""
    out = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        module = ".".join(parts)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] if node.module != "dcmkd" else \
                    [f"dcmkd.{a.name}" if (SRC / f"{a.name}.py").exists() or
                     (SRC / a.name).is_dir() else "dcmkd" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("dcmkd"):
                    out.append((module, name, f"{path.name}:{node.lineno}"))
    return out


def test_every_package_has_a_layer():
    packages = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
                if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    assert packages - set(LAYER) == set()


def test_imports_only_go_down_the_layers():
    upward = [f"{where}: {a} imports {b}" for a, b, where in _imports()
              if _package(a) != _package(b) and LAYER[_package(b)] >= LAYER[_package(a)]]
    assert upward == []
