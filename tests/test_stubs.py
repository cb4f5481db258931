"""The hand-written stub python/slot_cpp/_core.pyi checked against the built module.

mypy's stubtest compares every public name of slot_cpp._core (functions,
classes, methods, properties, attributes, with their kinds: a property, a
read-only attribute) with the stub's, both ways: a binding renamed, added or
removed fails it. It cannot read pybind11 functions' signatures (they are
builtins without __text_signature__), so the second test compares argument
names with the signatures pybind11 writes into each docstring.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import slot_cpp
import slot_cpp._core as core

# Beside the package's Python files (with an editable install the compiled
# module itself lies elsewhere).
STUB = Path(slot_cpp.__file__).with_name("_core.pyi")


def test_stubtest_passes(tmp_path):
    pytest.importorskip("mypy.stubtest", reason="needs mypy (the test extra)")
    # From an empty folder, so that no mypy configuration or source tree
    # around the repository changes what stubtest sees.
    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "slot_cpp._core"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"stubtest found differences:\n{proc.stdout}\n{proc.stderr}"


def _split_params(text):
    """Splits a signature's parameter list at its top-level commas."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current)
    return parts


def _runtime_params(obj, name):
    """Argument names from pybind11's docstring signature `name(a: T, b: U = ...) -> R`; None when absent."""
    doc = getattr(obj, "__doc__", None) or ""
    first = doc.lstrip().split("\n", 1)[0]
    if not first.startswith(name + "("):
        return None  # not a pybind11 function (e.g. the constructor of a class with none bound)
    depth, end = 0, None
    for i, ch in enumerate(first[len(name):], start=len(name)):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                end = i
                break
    assert end is not None, f"cannot parse the signature of {name}: {first}"
    names = []
    for part in _split_params(first[len(name) + 1:end]):
        arg = part.split(":", 1)[0].split("=", 1)[0].strip()
        if arg != "self":
            names.append(arg)
    return names


def _stub_params(fn):
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg != "self"]
    if a.vararg:
        names.append("*" + a.vararg.arg)
    if a.kwarg:
        names.append("**" + a.kwarg.arg)
    return names


def _stub_functions():
    """(qualified name, runtime object, stub def) for every function and method of the stub but properties."""
    tree = ast.parse(STUB.read_text())
    out = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out.append((node.name, getattr(core, node.name, None), node))
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            cls = getattr(core, node.name, None)
            for item in node.body:
                if not isinstance(item, ast.FunctionDef):
                    continue
                if any(isinstance(d, ast.Name) and d.id == "property" for d in item.decorator_list):
                    continue
                out.append((f"{node.name}.{item.name}", getattr(cls, item.name, None), item))
    return out


def test_argument_names_match():
    checked = 0
    mismatches = []
    for qualname, obj, fn in _stub_functions():
        assert obj is not None, f"{qualname} is in the stub but not in the module"
        runtime = _runtime_params(obj, fn.name)
        if runtime is None:
            continue
        checked += 1
        if runtime != _stub_params(fn):
            mismatches.append(f"{qualname}: module {runtime}, stub {_stub_params(fn)}")
    assert not mismatches, "argument names differ:\n" + "\n".join(mismatches)
    assert checked >= 30  # the check really ran over the bindings
