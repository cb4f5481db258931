"""slot-cpp serve (the OpenAI-compatible HTTP server) and rpc-server (llama.cpp's ggml rpc-server)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .. import _core
from ..options import ServerSettings, add_arguments, group_from_arguments
from ._common import UsageError, _add_model_options, _model_settings


def register(sub: Any) -> None:
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the [server] extra)")
    _add_model_options(sv, defaults={"n_ctx": 0})
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    sv.add_argument("--port", type=int, default=8080)
    # --model-id, --api-key, --chat-template, --pooling, --max-waiting, --max-tokens-cap: from the
    # definitions of the server's settings (slot_cpp.options.ServerSettings, the server's ServerConfig).
    add_arguments(sv, ServerSettings, defaults={"api_key": os.environ.get("SLOT_CPP_API_KEY")})
    sv.add_argument("--rtd", action="append", metavar="NAME=PATH", help="an RTD datastore requests may name")
    sv.add_argument("--reward", action="append", metavar="NAME=SPEC",
                    help="a QAlign reward requests may name: NAME=head:FILE.npz or NAME=judge")
    sv.add_argument("--corrector", action="append", metavar="NAME=MODEL.gguf[,ADAPTER.gguf]",
                    help="an LMCor corrector requests may name (extra_body lmcor.corrector)")
    sv.set_defaults(func=cmd_serve)

    rs = sub.add_parser("rpc-server", help="run llama.cpp's ggml rpc-server (built with this package) so that "
                                           "another machine's model can offload layers here",
                        description="Runs the rpc-server binary built from the same llama.cpp tree; every option "
                                    "after 'rpc-server' goes to it (e.g. -H 0.0.0.0 -p 50052 -t 4). It has no "
                                    "authentication: expose it on trusted networks only.")
    rs.add_argument("server_args", nargs=argparse.REMAINDER)
    rs.set_defaults(func=cmd_rpc_server)


# ---------------------------------------------------------------- rpc-server
def rpc_server_path() -> Path:
    """The ggml rpc-server binary shipped in the package."""
    exe = "rpc-server.exe" if os.name == "nt" else "rpc-server"
    # Beside the native module (an editable install keeps the Python files elsewhere);
    # a portable build keeps it in lib/, beside the backends it loads.
    here = Path(_core.__file__).resolve().parent
    return next((p for p in (here / "bin" / exe, here / "lib" / exe, here / exe) if p.is_file()), here / "bin" / exe)


def cmd_rpc_server(args: argparse.Namespace) -> int:
    path = rpc_server_path()
    if not path.is_file():
        raise UsageError(f"this build has no rpc-server ({path}); build with -DSLOT_CPP_RPC=ON")
    os.execv(str(path), [str(path), *args.server_args])
    return 0  # not reached


# ---------------------------------------------------------------- serve
def _check_serve_args(args: argparse.Namespace, server: Any) -> tuple[dict, dict, dict]:
    """The named datastores, rewards and correctors of the flags, checked
    (the settings' own ranges are checked by their groups)."""
    if not 0 <= args.port < 65536:
        raise UsageError("--port must be in [0, 65535]")
    datastores = server.parse_named_paths(args.rtd, "--rtd")
    rewards = server.parse_named_paths(args.reward, "--reward")
    correctors = server.parse_named_paths(args.corrector, "--corrector")
    for name, path in datastores.items():
        if not Path(path).is_file():
            raise UsageError(f"--rtd {name}: no such file: {path}")
    for name, spec in correctors.items():
        for path in spec.split(","):
            if not Path(path).is_file():
                raise UsageError(f"--corrector {name}: no such file: {path}")
    return datastores, rewards, correctors


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .. import server
    except ImportError as exc:
        raise UsageError(str(exc)) from None
    datastores, rewards, correctors = _check_serve_args(args, server)
    # Each group made once from the flags and handed on whole.
    settings = _model_settings(args)
    config = group_from_arguments(args, ServerSettings, datastores=datastores, rewards=rewards,
                                  correctors=correctors)
    print(f"slot-cpp: serving on http://{args.host}:{args.port}/v1", file=sys.stderr)
    server.serve(args.model, host=args.host, port=args.port, settings=settings, config=config,
                 log_level="warning" if args.quiet else "info")
    return 0
