"""Imports point one way: base < formats < kernels < runtime < converters, serve < benchmarks, CLI.

Every import statement of the package (module level or inside a function) is read from
the source with ast, mapped to the layer of the module it names, and checked against the
layer of the module that holds it. A wrong-way import fails here with its file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the package's folders: import name prefix -> source folder
PACKAGES = {
    "dsf_runtime.converters": "converters",
    "dsf_runtime.serve": "serve",
    "dsf_runtime.benchmarks": "benchmarks",
    "dsf_runtime": "dsf_runtime",
}
BASE = ("dsf_runtime.errors", "dsf_runtime.settings", "dsf_runtime.units")
LAYERS = [  # (layer, module prefixes), lowest first
    ("base", BASE),
    ("formats", ("dsf_runtime.formats",)),
    ("kernels", ("dsf_runtime.kernels",)),
    ("converters", ("dsf_runtime.converters",)),
    ("serve", ("dsf_runtime.serve",)),
    ("top", ("dsf_runtime.benchmarks", "dsf_runtime.cli")),
    ("runtime", ("dsf_runtime",)),  # everything else in dsf_runtime: linear, checkpoint, hf, generate, ...
]
ALLOWED = {
    "base": {"base"},
    "formats": {"base", "formats"},
    "kernels": {"base", "formats", "kernels"},
    "runtime": {"base", "formats", "kernels", "runtime"},
    "converters": {"base", "formats", "kernels", "runtime", "converters"},
    "serve": {"base", "formats", "kernels", "runtime", "serve"},
    "top": {"base", "formats", "kernels", "runtime", "converters", "serve", "top"},
}


def layer_of(module: str) -> str:
    if module == "dsf_runtime":
        return "top"  # the package's __init__: the public API facade over every layer
    for layer, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return layer
    raise AssertionError(f"{module} is in no layer")


def package_modules() -> dict[str, Path]:
    modules = {}
    for prefix, folder in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([prefix, *parts])
            modules.setdefault(name, path)  # dsf_runtime's own folder never holds converters/serve/benchmarks
    return modules


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import of ours in the file, resolving relative ones."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from dsf_runtime import settings` imports the submodule dsf_runtime.settings
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found += [(node.lineno, name) for name in names if name.startswith("dsf_runtime.")]
    return found


MODULES = package_modules()


def test_the_package_is_found():
    assert {
        "dsf_runtime.formats.bitmap",
        "dsf_runtime.kernels.cpu_bitmap",
        "dsf_runtime.serve.app",
        "dsf_runtime.converters.calibrate",
        "dsf_runtime.benchmarks.layer",
        "dsf_runtime.cli",
    } <= set(MODULES)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_one_way(module):
    path = MODULES[module]
    mine = layer_of(module)
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {name} ({layer_of(name)})"
        for line, name in imports_of(path, module)
        if layer_of(name) not in ALLOWED[mine]
    ]
    assert not wrong, f"{module} ({mine}) imports upward:\n" + "\n".join(wrong)


def test_a_wrong_way_import_is_caught(tmp_path):
    fake = tmp_path / "bitmap.py"
    fake.write_text("def f():\n    from dsf_runtime.kernels.cpu_bitmap import check_bitmap\n")
    found = imports_of(fake, "dsf_runtime.formats.bitmap")
    assert found == [(2, "dsf_runtime.kernels.cpu_bitmap")]
    assert layer_of(found[0][1]) not in ALLOWED["formats"]
