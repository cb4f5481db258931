"""MkDocs hook: ship benchmarks/results/ with the site.

Pages link to measurements as ``../benchmarks/results/NAME``, the file's
path relative to ``docs/`` in the repository. In the built site every page
but the home page sits one folder deep (``/slot/``), so the same link points
at ``/benchmarks/results/NAME``; this hook copies the folder there.
"""

from __future__ import annotations

import shutil
from pathlib import Path


def on_post_build(config, **kwargs):
    root = Path(config["config_file_path"]).resolve().parent
    source = root / "benchmarks" / "results"
    if source.is_dir():
        target = Path(config["site_dir"]) / "benchmarks" / "results"
        shutil.copytree(source, target, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.tmp"))
