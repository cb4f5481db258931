"""Command line: ``slot-cpp`` or ``python -m slot_cpp``.

Subcommands: generate, chat, eval gsm8k, eval mc, eval lmcor, explain, info,
qalign, qalign-head, rtd build, rtd info, rtd tune, serve, rpc-server,
lmcor correct, lmcor make-data, lmcor train; a module per group, each with
``register(subparsers)``. The evaluation harness is slot_cpp.evaluation.
Exit codes: 0 success, 1 runtime failure, 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .. import SlotError, _core
from . import eval as eval_cmd
from . import explain, generate, info, lmcor, qalign, rtd, serve
from ._common import UsageError, _configure_logging
from .serve import rpc_server_path

__all__ = ["main", "build_parser", "rpc_server_path", "UsageError"]

# In the order `slot-cpp --help` lists the commands.
_GROUPS = (generate, eval_cmd, explain, qalign, rtd, serve, info, lmcor)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slot-cpp", description="SLOT test-time optimisation for GGUF models")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in _GROUPS:
        group.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after 'rpc-server' belongs to the binary; argparse would read
    # its options (-H, -p) as its own.
    passthrough = None
    if "rpc-server" in argv:
        at = argv.index("rpc-server")
        argv, passthrough = argv[:at + 1], argv[at + 1:]
    args = parser.parse_args(argv)
    if passthrough is not None:
        args.server_args = passthrough
    _configure_logging(args)
    try:
        return int(args.func(args))
    except (UsageError, ValueError, TypeError, FileNotFoundError, ImportError, _core.ModelLoadError,
            _core.ContextLengthError, _core.UnsupportedModelError) as exc:
        print(f"slot-cpp: error: {exc}", file=sys.stderr)
        return 2
    except (SlotError, OSError) as exc:
        print(f"slot-cpp: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nslot-cpp: interrupted", file=sys.stderr)
        return 130
