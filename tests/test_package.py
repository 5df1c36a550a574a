"""Packaging promises: light import, a stub that matches the compiled module, py.typed."""

from __future__ import annotations

import ast
import pathlib

from _support import run_python

import weightwire
from weightwire import _native


def test_import_weightwire_loads_neither_jax_nor_ray() -> None:
    code = ("import sys, weightwire, weightwire.net, weightwire.staging, weightwire.cli\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'ray'))\n"
            "print(heavy)")
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_stub_declares_exactly_what_the_native_module_exports() -> None:
    stub = pathlib.Path(_native.__file__).with_name("_native.pyi")
    if not stub.exists():  # editable installs keep the stub in the source tree
        stub = pathlib.Path(weightwire.__file__).with_name("_native.pyi")
    tree = ast.parse(stub.read_text())
    declared = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    declared |= {node.target.id for node in tree.body
                 if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
    exported = {name for name in dir(_native) if not name.startswith("_")}
    assert declared == exported
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        methods = {m.name for m in cls.body if isinstance(m, ast.FunctionDef) and not m.name.startswith("__")}
        missing = {m for m in methods if not hasattr(getattr(_native, cls.name), m)}
        assert not missing, f"{cls.name} stub declares {missing}, which the module lacks"


def test_package_is_typed() -> None:
    assert pathlib.Path(weightwire.__file__).with_name("py.typed").exists()
