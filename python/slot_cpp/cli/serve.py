"""slot-cpp serve (the OpenAI-compatible HTTP server) and rpc-server (llama.cpp's ggml rpc-server)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .. import _core
from ._common import UsageError, _add_model_options, _lora_specs


def register(sub: Any) -> None:
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the [server] extra)")
    _add_model_options(sv)
    sv.set_defaults(n_ctx=0)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    sv.add_argument("--port", type=int, default=8080)
    sv.add_argument("--api-key", default=os.environ.get("SLOT_CPP_API_KEY"),
                    help="require 'Authorization: Bearer KEY' (default: $SLOT_CPP_API_KEY, else none)")
    sv.add_argument("--rtd", action="append", metavar="NAME=PATH", help="an RTD datastore requests may name")
    sv.add_argument("--reward", action="append", metavar="NAME=SPEC",
                    help="a QAlign reward requests may name: NAME=head:FILE.npz or NAME=judge")
    sv.add_argument("--corrector", action="append", metavar="NAME=MODEL.gguf[,ADAPTER.gguf]",
                    help="an LMCor corrector requests may name (extra_body lmcor.corrector)")
    sv.add_argument("--max-waiting", type=int, default=16,
                    help="requests that may wait for a free sequence; more get 503")
    sv.add_argument("--max-tokens-cap", type=int, default=4096, help="the largest max_tokens a request may ask")
    sv.add_argument("--model-id", default=None, help="the model name clients use (default: the file's stem)")
    sv.add_argument("--pooling", choices=("mean", "last"), default="mean",
                    help="how /v1/embeddings pools a text's final hidden states (default: mean)")
    sv.add_argument("--chat-template", default=None,
                    help="built-in chat template name for models without one (see 'slot-cpp info')")
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
    """The named datastores, rewards and correctors of the flags, checked."""
    for name, value, low in (("--port", args.port, 0), ("--max-waiting", args.max_waiting, 0),
                             ("--max-tokens-cap", args.max_tokens_cap, 1), ("--n-parallel", args.n_parallel, 1),
                             ("--n-ctx", args.n_ctx, 0)):
        if value < low:
            raise UsageError(f"{name} must be >= {low}")
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
    print(f"slot-cpp: serving on http://{args.host}:{args.port}/v1", file=sys.stderr)
    server.serve(args.model, host=args.host, port=args.port, n_parallel=args.n_parallel, n_ctx=args.n_ctx,
                 n_threads=args.threads, n_gpu_layers=args.n_gpu_layers, api_key=args.api_key,
                 datastores=datastores, rewards=rewards, correctors=correctors, max_waiting=args.max_waiting,
                 max_tokens_cap=args.max_tokens_cap, model_id=args.model_id, chat_template=args.chat_template,
                 rpc=args.rpc, lora=_lora_specs(args.lora) or None,
                 log_level="warning" if args.quiet else "info", pooling=args.pooling)
    return 0
