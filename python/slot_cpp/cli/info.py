"""slot-cpp info: model metadata and build facts."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .. import _core
from ._common import _add_model_options, _open_model


def register(sub: Any) -> None:
    info = sub.add_parser("info", help="model metadata and build facts")
    info.add_argument("--json", action="store_true")
    _add_model_options(info)
    info.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    from .. import __version__

    cpu = _core.cpu_backend()
    build = {"slot_cpp": __version__, "llama_cpp": _core.llama_cpp_source,
             "cpu_variant": cpu["variant"],
             "cpu_backend": (f"loaded at run time from {cpu['library']}" if cpu["dynamic"] else "static build")
             + (f" (forced by SLOT_CPP_CPU_VARIANT={cpu['forced']})" if cpu["forced"] else ""),
             "cpu_variants": " ".join(f"{k}:{v}" for k, v in cpu["variants"].items()),
             "cpu_features": " ".join(cpu["cpu_features"]), "head_kernels": cpu["kernels"],
             "backends": ", ".join(cpu["backends"]), "devices": _core.backend_devices(),
             "gpu_offload": _core.supports_gpu_offload(), "system_info": _core.system_info().strip()}
    with _open_model(args) as model:
        info = model.info
        data = {"model": dict(info.__dict__), "build": build}
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for section, values in data.items():
        print(f"[{section}]")
        for k, v in values.items():
            print(f"  {k}: {v}")
    return 0
