"""The binary wheel, installed the way a user installs it: into a fresh
virtual environment (pip install --no-deps <wheel> numpy), with no compiler
reachable on PATH, then run from outside the source tree.

The wheel is built in a session fixture by ``pip wheel`` from the same build
directory that ``pip install .`` used (scikit-build-core's build-dir,
build/{wheel_tag}; build/portable-{wheel_tag} when the installed slot_cpp is
a portable build), so it costs seconds, not a rebuild; SLOT_CPP_TEST_WHEEL
names a wheel built elsewhere instead (CI). Both kinds of build are tested:
the default static one (its CPU backend reported as "native" or "built-in")
and the portable one (SLOT_CPP_PORTABLE=ON), where a CPU variant can also be
forced with SLOT_CPP_CPU_VARIANT.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import Any

import pytest

from slot_cpp import _core

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Question: What is the capital of France?\nAnswer:"
COMPILERS = ("cc", "c++", "gcc", "g++", "clang", "clang++", "cl", "cmake", "ninja")

pytestmark = pytest.mark.slow


def _build_dir(portable: bool) -> Path:
    """scikit-build-core's build-dir for this interpreter (build/{wheel_tag}, e.g.
    build/cp311-cp311-linux_x86_64), with the portable- prefix for a portable build."""
    abi = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    prefix = "portable-" if portable else ""
    exact = ROOT / "build" / f"{prefix}{abi}-{abi}-{plat}"
    if exact.is_dir():
        return exact
    found = sorted((ROOT / "build").glob(f"{prefix}{abi}-{abi}-*"))
    return found[0] if found else exact


@pytest.fixture(scope="session")
def installed_build() -> dict[str, Any]:
    return _core.cpu_backend()


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory, installed_build: dict[str, Any]) -> dict[str, Any]:
    given = os.environ.get("SLOT_CPP_TEST_WHEEL")
    if given:
        return {"path": Path(given), "log": "", "build_dir": None}
    portable = installed_build["dynamic"]
    build_dir = _build_dir(portable)
    if not (build_dir / "CMakeCache.txt").is_file():
        pytest.fail(f"no build directory {build_dir}: install slot_cpp with `pip install --no-build-isolation .`"
                    + (" -Ccmake.define.SLOT_CPP_PORTABLE=ON -Cbuild-dir=build/portable-{wheel_tag}" if portable else "")
                    + " first, or set SLOT_CPP_TEST_WHEEL to a wheel")
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-v", str(ROOT), "-w", str(out),
           f"-Cbuild-dir={build_dir.relative_to(ROOT)}"]
    if portable:
        cmd.append("-Ccmake.define.SLOT_CPP_PORTABLE=ON")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    wheels = sorted(out.glob("slot_cpp-*.whl"))
    assert len(wheels) == 1, wheels
    return {"path": wheels[0], "log": proc.stdout + proc.stderr, "build_dir": build_dir}


@pytest.fixture(scope="session")
def venv(tmp_path_factory: pytest.TempPathFactory, wheel: dict[str, Any]) -> Path:
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=600)
    python = root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel["path"]), "numpy"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return python


def _no_compiler_env(python: Path, **extra: str) -> dict[str, str]:
    """The environment of a user's machine without a toolchain: PATH holds the
    virtual environment only; nothing points back at the source tree."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "SLOT_CPP_CPU_VARIANT", "SLOT_CPP_KERNELS", "SLOT_CPP_BACKEND_DIR",
                        "CC", "CXX", "LD_LIBRARY_PATH", "PYTHONHOME")}
    env["PATH"] = str(python.parent)
    for name in COMPILERS:
        assert shutil.which(name, path=env["PATH"]) is None, f"{name} is reachable on the test's PATH"
    env.update(extra)
    return env


def _run(python: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(python), "-m", "slot_cpp", *args], cwd=cwd, env=_no_compiler_env(python, **env),
                          capture_output=True, text=True, timeout=900)


def _generate(python: Path, cwd: Path, model: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return _run(python, cwd, "generate", PROMPT, "--model", str(model), "--steps", "0", "--max-tokens", "12",
                "--json", **env)


def test_wheel_is_self_contained(wheel: dict[str, Any], installed_build: dict[str, Any]) -> None:
    names = zipfile.ZipFile(wheel["path"]).namelist()
    assert any(n.startswith("slot_cpp/_core") for n in names)
    assert not any(n.startswith(("include/", "lib/", "bin/", "share/")) for n in names), "files outside the package"
    if installed_build["dynamic"]:
        cpu = [n for n in names if "ggml-cpu" in n]
        assert cpu, "no CPU backend module in the wheel"
        if "x64" in installed_build["variants"]:
            assert any(n.endswith(("/libggml-cpu-x64.so", "/ggml-cpu-x64.dll")) for n in cpu), cpu
        assert not any("sapphirerapids" in n or "amx" in n.lower() for n in names), "an AMX variant is shipped"
        assert any("/libllama" in n or "/llama.dll" in n for n in names)
    else:
        assert not any("ggml-cpu-" in n for n in names)


def test_wheel_build_reused_the_build_tree(wheel: dict[str, Any]) -> None:
    """pip wheel after pip install compiles nothing of llama.cpp's library or
    ggml again (most of the build). The few common/ sources and slot_cpp's own
    may compile again when pybind11 moved (from pip's isolated build
    environment into the venv, as after `pip install ".[test]"`)."""
    if wheel["build_dir"] is None:
        pytest.skip("SLOT_CPP_TEST_WHEEL: the wheel was built elsewhere")
    rebuilt = [line for line in wheel["log"].splitlines()
               if "Building" in line and " object " in line
               and ("llama.cpp/src/" in line or "llama.cpp/ggml/" in line)]
    assert not rebuilt, f"{len(rebuilt)} llama.cpp objects were compiled again, e.g. {rebuilt[:3]}"


def test_installed_wheel_generates_and_reports_its_backend(venv: Path, tmp_path: Path, gemma_path: Path,
                                                            installed_build: dict[str, Any]) -> None:
    proc = _generate(venv, tmp_path, gemma_path)
    assert proc.returncode == 0, proc.stderr
    text = json.loads(proc.stdout)["text"]
    assert text.strip()

    where = subprocess.run([str(venv), "-c", "import slot_cpp, sys; print(slot_cpp.__file__)"], cwd=tmp_path,
                           env=_no_compiler_env(venv), capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).resolve().is_relative_to(venv.parent.parent.resolve())

    proc = _run(venv, tmp_path, "info", "--model", str(gemma_path), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    build, model = info["build"], info["model"]
    assert build["cpu_variant"] == model["cpu_variant"] == installed_build["variant"]
    assert "CPU" in model["backend"].split(", ")
    assert build["head_kernels"] in ("avx512", "avx2", "generic")
    if installed_build["dynamic"]:
        assert build["cpu_backend"].startswith("loaded at run time from ")
        assert f"ggml-cpu-{build['cpu_variant']}" in build["cpu_backend"]
    else:
        assert build["cpu_variant"] in ("native", "built-in") and build["cpu_backend"] == "static build"

    plain = _run(venv, tmp_path, "info", "--model", str(gemma_path))
    assert plain.returncode == 0, plain.stderr
    assert f"cpu_variant: {installed_build['variant']}" in plain.stdout


def test_forced_variant_gives_the_same_greedy_answer(venv: Path, tmp_path: Path, gemma_path: Path,
                                                     installed_build: dict[str, Any]) -> None:
    best = _generate(venv, tmp_path, gemma_path)
    assert best.returncode == 0, best.stderr
    # The static build's own name is accepted; a portable build's baseline x86-64 variant is loaded instead.
    name = "x64" if installed_build["dynamic"] and "x64" in installed_build["variants"] else installed_build["variant"]
    forced = _generate(venv, tmp_path, gemma_path, SLOT_CPP_CPU_VARIANT=name)
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["tokens"] == json.loads(best.stdout)["tokens"]
    proc = _run(venv, tmp_path, "info", "--model", str(gemma_path), "--json", SLOT_CPP_CPU_VARIANT=name)
    assert proc.returncode == 0, proc.stderr
    build = json.loads(proc.stdout)["build"]
    assert build["cpu_variant"] == name
    if installed_build["dynamic"] and name == "x64":
        assert build["head_kernels"] == "generic"  # the kernels follow the variant down
        assert "forced by SLOT_CPP_CPU_VARIANT=x64" in build["cpu_backend"]


def test_missing_variant_is_a_clear_error(venv: Path, tmp_path: Path, gemma_path: Path,
                                          installed_build: dict[str, Any]) -> None:
    proc = _generate(venv, tmp_path, gemma_path, SLOT_CPP_CPU_VARIANT="pentium4")
    assert proc.returncode == 1
    assert "SLOT_CPP_CPU_VARIANT=pentium4" in proc.stderr and "Traceback" not in proc.stderr
    if installed_build["dynamic"]:
        assert "no such CPU variant" in proc.stderr
        for name in installed_build["variants"]:
            assert name in proc.stderr  # the variants present are named
    else:
        assert "static build" in proc.stderr
    check = subprocess.run([str(venv), "-c", "import slot_cpp\ntry:\n    slot_cpp._core.cpu_backend()\n"
                            "except slot_cpp._core.CpuBackendError as e:\n    print('CpuBackendError', e)\n"],
                           cwd=tmp_path, env=_no_compiler_env(venv, SLOT_CPP_CPU_VARIANT="pentium4"),
                           capture_output=True, text=True, timeout=120)
    assert check.stdout.startswith("CpuBackendError SLOT_CPP_CPU_VARIANT=pentium4"), check.stdout + check.stderr
