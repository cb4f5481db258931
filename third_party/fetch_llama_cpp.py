#!/usr/bin/env python3
"""Fetch the pinned llama.cpp source tree into third_party/llama.cpp.

The tree is the one vendored in the llama-cpp-python source distribution on the
Python package index. The sdist is downloaded with pip, its sha256 is checked,
and only ``vendor/llama.cpp`` is unpacked, then patched by
llama_cpp_patches.py. A stamp file records the hash and the patches so a
second run is a no-op.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llama_cpp_patches  # noqa: E402

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SDIST = "llama_cpp_python-0.3.36.tar.gz"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
MEMBER_PREFIX = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
STAMP = ".slot_cpp_source"
# Parts of the tree that no build or test reads; leaving them out keeps the
# unpacked tree and our sdist small.
SKIP_FILES = (".git", ".gitmodules")
SKIP_DIRS = ("docs/", "media/", "tools/server/", "examples/", ".github/", "app/", "benches/")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    env = os.environ.get("SLOT_CPP_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "slot_cpp"


def pip_command() -> list[str]:
    """A pip that works from inside an isolated build environment too."""
    candidates = [[sys.executable, "-m", "pip"]]
    for name in ("pip3", "pip"):
        found = shutil.which(name)
        if found:
            candidates.append([found])
    for cmd in candidates:
        probe = subprocess.run(cmd + ["--version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return cmd
    raise SystemExit("fetch_llama_cpp: no working pip found to download " + SDIST)


def download(target_dir: Path) -> Path:
    target_dir.mkdir(parents=True, exist_ok=True)
    sdist = target_dir / SDIST
    if sdist.exists() and sha256_of(sdist) == SHA256:
        return sdist
    with tempfile.TemporaryDirectory() as tmp:
        cmd = pip_command() + [
            "download", "--no-deps", "--no-binary", PACKAGE,
            f"{PACKAGE}=={VERSION}", "-d", tmp,
        ]
        print("fetch_llama_cpp: " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        got = Path(tmp) / SDIST
        if not got.exists():
            raise SystemExit(f"fetch_llama_cpp: pip did not produce {SDIST}")
        actual = sha256_of(got)
        if actual != SHA256:
            raise SystemExit(f"fetch_llama_cpp: sha256 mismatch for {SDIST}: {actual} != {SHA256}")
        shutil.move(str(got), sdist)
    return sdist


def unpack(sdist: Path, dest: Path) -> None:
    if sha256_of(sdist) != SHA256:
        raise SystemExit(f"fetch_llama_cpp: sha256 mismatch for {sdist}")
    staging = dest.parent / (dest.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.name.startswith(MEMBER_PREFIX):
                continue
            rel = member.name[len(MEMBER_PREFIX):]
            if not rel or rel in SKIP_FILES or rel.startswith(SKIP_DIRS) or ".." in Path(rel).parts:
                continue
            if not (member.isfile() or member.isdir()):
                continue
            out = staging / rel
            if member.isdir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            assert src is not None
            with out.open("wb") as handle:
                shutil.copyfileobj(src, handle)
            if member.mode & 0o111:
                out.chmod(0o755)
    llama_cpp_patches.apply(staging)
    (staging / STAMP).write_text(_stamp())
    if dest.exists():
        shutil.rmtree(dest)
    staging.rename(dest)


def _stamp() -> str:
    return f"{PACKAGE}=={VERSION} sha256={SHA256} patches={llama_cpp_patches.digest()}\n"


def is_current(dest: Path) -> bool:
    stamp = dest / STAMP
    return stamp.exists() and stamp.read_text() == _stamp()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    here = Path(__file__).resolve().parent
    parser.add_argument("--dest", type=Path, default=here / "llama.cpp")
    parser.add_argument("--sdist", type=Path, help="use this already-downloaded sdist")
    args = parser.parse_args()
    dest: Path = args.dest.resolve()
    if is_current(dest):
        print(f"fetch_llama_cpp: {dest} is current")
        return 0
    sdist = args.sdist if args.sdist else download(cache_dir())
    unpack(sdist, dest)
    print(f"fetch_llama_cpp: unpacked llama.cpp from {PACKAGE} {VERSION} into {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
