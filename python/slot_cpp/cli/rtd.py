"""slot-cpp rtd build, rtd info and rtd tune: RTD retrieval datastores."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional

from ..rtd import Datastore, DatastoreError, tune
from ._common import UsageError, _add_model_options, _check_count, _float_list, _int_list, _open_model, _read_rows


def register(sub: Any) -> None:
    rtd_p = sub.add_parser("rtd", help="RTD retrieval datastores: build, info, tune")
    rtd_sub = rtd_p.add_subparsers(dest="rtd_command", required=True)
    rb = rtd_sub.add_parser("build", help="build (or --append to) a datastore from JSONL rows")
    rb.add_argument("--data", required=True,
                    help="JSONL of {prompt, completion} (generation) or {question, choices, answer} (choice)")
    rb.add_argument("--out", "-o", required=True, help="the datastore file to write (with --append: to extend)")
    rb.add_argument("--mode", choices=("generation", "choice"), default=None,
                    help="default: what the first row holds")
    rb.add_argument("--heads", type=int, default=None, help="split keys into H slices searched apart (default 1)")
    rb.add_argument("--shots", type=int, default=0,
                    help="choice mode: the first N rows become the prompt's solved examples (stored in the "
                         "datastore) and are not added as keys")
    rb.add_argument("--append", action="store_true",
                    help="load --out (built with this model) and add the rows' keys to it")
    rb.add_argument("--ivf", type=int, default=None, metavar="NLIST",
                    help="also build an inverted file of NLIST lists (needs faiss; heads=1)")
    rb.add_argument("--nprobe", type=int, default=None, help="with --ivf: the default lists searched per query")
    rb.add_argument("--limit", type=int, default=None, help="add the first N rows only (after the shots)")
    rb.add_argument("--json", action="store_true", help="print the datastore's info as JSON")
    _add_model_options(rb)
    rb.set_defaults(func=cmd_rtd_build)

    ri = rtd_sub.add_parser("info", help="sizes, build parameters and defaults of a datastore (no model needed)")
    ri.add_argument("store", help="datastore file")
    ri.add_argument("--json", action="store_true")
    ri.set_defaults(func=cmd_rtd_info)

    rt = rtd_sub.add_parser("tune", help="choose k, temperature and lambda or a gate on validation rows by cross-validation; saved as defaults")
    rt.add_argument("store", help="datastore file")
    rt.add_argument("--data", required=True, help="validation JSONL (rows not in the datastore), same format")
    rt.add_argument("--limit", type=int, default=None, help="first N validation rows only")
    rt.add_argument("--ks", type=_int_list, default=None, help="comma-separated k values to try")
    rt.add_argument("--temperature-scales", type=_float_list, default=None,
                    help="comma-separated multiples of the typical neighbour distance to try as temperatures")
    rt.add_argument("--lams", type=_float_list, default=None, help="comma-separated lambda values to try")
    rt.add_argument("--gate-caps", type=_float_list, default=None,
                    help="comma-separated ceilings of the fitted gate to try (default 0.25,0.5,1)")
    rt.add_argument("--no-gate", action="store_true", help="try one lambda for every query only (no gate)")
    rt.add_argument("--folds", type=int, default=5, help="cross-validation folds over the validation rows")
    rt.add_argument("--out", "-o", default=None, help="write the tuned datastore here (default: STORE itself)")
    rt.add_argument("--json", action="store_true", help="print the whole tuning result as JSON")
    _add_model_options(rt)
    rt.set_defaults(func=cmd_rtd_tune)


def _row_error(exc: DatastoreError, path: str, lines: list[int]) -> UsageError:
    """A datastore's 'row i: ...' error, told as the JSONL line it came from."""
    msg = str(exc)
    m = re.match(r"row (\d+)\b", msg)
    if m and int(m.group(1)) < len(lines):
        return UsageError(f"{path} line {lines[int(m.group(1))]}{msg[m.end():]}")
    return UsageError(msg)


def _require_faiss() -> None:
    try:
        import faiss  # noqa: F401
    except ImportError:
        raise UsageError("--ivf needs faiss: pip install 'slot_cpp[ann]' (faiss-cpu)") from None


# ---------------------------------------------------------------- rtd build
def _existing_store(args: argparse.Namespace) -> Optional[Datastore]:
    """With --append: the datastore --out names, checked against the flags."""
    if not args.append:
        return None
    if args.shots:
        raise UsageError("--shots cannot be used with --append: the datastore keeps the prompt format "
                         "it was built with")
    if not Path(args.out).exists():
        raise UsageError(f"--append: {args.out} does not exist (build it first, without --append)")
    existing = Datastore.load(args.out)
    if args.mode is not None and args.mode != existing.mode:
        raise UsageError(f"--mode {args.mode}, but {args.out} is a {existing.mode} datastore")
    if args.heads is not None and args.heads != existing.heads:
        raise UsageError(f"--heads {args.heads}, but {args.out} has {existing.heads} head(s)")
    return existing


def _build_rows(args: argparse.Namespace, mode: Optional[str]) -> tuple[list[dict], list[dict], list[int], str]:
    """(shots, rows to add, their line numbers, mode) of --data."""
    rows, lines, mode = _read_rows(args.data, mode)
    if args.shots and mode != "choice":
        raise UsageError("--shots is for choice datastores (rows with question, choices, answer)")
    if args.shots >= len(rows):
        raise UsageError(f"--shots {args.shots} leaves none of the {len(rows)} rows of {args.data} to add")
    shots, rows, lines = rows[:args.shots], rows[args.shots:], lines[args.shots:]
    if args.limit is not None:
        rows, lines = rows[:args.limit], lines[:args.limit]
    if not rows:
        raise UsageError("no rows to add (--limit 0)")
    return shots, rows, lines, mode


def cmd_rtd_build(args: argparse.Namespace) -> int:
    _check_count("--shots", args.shots)
    _check_count("--limit", args.limit)
    if args.heads is not None and args.heads < 1:
        raise UsageError("--heads must be >= 1")
    existing = _existing_store(args)
    if args.ivf is not None:
        if args.ivf < 1:
            raise UsageError("--ivf must be >= 1 (the number of inverted lists)")
        _require_faiss()
    elif args.nprobe is not None:
        raise UsageError("--nprobe needs --ivf")
    shots, rows, lines, mode = _build_rows(args, existing.mode if existing is not None else args.mode)
    progress = sys.stderr.isatty()
    with _open_model(args) as model:
        start = time.perf_counter()
        try:
            if existing is not None:
                existing.check_model(model)
                had_ivf = existing.has_ivf
                before = len(existing)
                store = existing.extend(model, rows, progress=progress)
                if had_ivf and args.ivf is None:
                    print(f"slot-cpp: note: appending dropped {args.out}'s inverted file; pass --ivf to build it "
                          "again", file=sys.stderr)
            else:
                before = 0
                store = Datastore.build(model, rows, mode=mode, heads=args.heads or 1, shots=shots,
                                        progress=progress)
        except DatastoreError as exc:
            raise _row_error(exc, args.data, lines) from None
        if args.ivf is not None:
            try:
                store.build_ivf(model, args.ivf, nprobe=args.nprobe)
            except ImportError as exc:
                raise UsageError(str(exc)) from None
        seconds = time.perf_counter() - start
        path = store.save(args.out)
    added = len(store) - before
    line = (f"rtd build: {added} keys from {len(rows)} rows in {seconds:.1f}s ({added / max(seconds, 1e-9):.1f} "
            f"keys/s); {path}: {len(store)} {store.mode} keys" + (f", ivf {args.ivf} lists" if args.ivf else ""))
    if args.json:
        print(line, file=sys.stderr)
        print(json.dumps(store.info(), indent=2))
    else:
        print(line)
    return 0


# ---------------------------------------------------------------- rtd info, rtd tune
def _print_tree(values: dict[str, Any], indent: int = 0) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and value:
            print(f"{' ' * indent}{key}:")
            _print_tree(value, indent + 2)
        elif isinstance(value, float):
            print(f"{' ' * indent}{key}: {value:.6g}")
        else:
            print(f"{' ' * indent}{key}: {value}")


def cmd_rtd_info(args: argparse.Namespace) -> int:
    info = Datastore.load(args.store).info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_tree(info)
    return 0


def cmd_rtd_tune(args: argparse.Namespace) -> int:
    _check_count("--limit", args.limit)
    store = Datastore.load(args.store)
    rows, lines, _ = _read_rows(args.data, store.mode)
    if args.limit is not None:
        rows = rows[:args.limit]
    if not rows:
        raise UsageError("no validation rows (--limit 0)")
    grid: dict[str, Any] = {}
    if args.ks is not None:
        grid["ks"] = args.ks
    if args.temperature_scales is not None:
        grid["temperature_scales"] = args.temperature_scales
    if args.lams is not None:
        grid["lams"] = args.lams
    if args.gate_caps is not None:
        grid["gate_caps"] = args.gate_caps
    if args.no_gate:
        grid["gate_caps"] = ()
    if args.folds < 2:
        raise UsageError("--folds must be >= 2")
    grid["folds"] = args.folds
    with _open_model(args) as model:
        store.check_model(model)
        try:
            result = tune(model, store, rows, save=True, progress=sys.stderr.isatty(), **grid)
        except DatastoreError as exc:
            raise _row_error(exc, args.data, lines) from None
        path = store.save(args.out or args.store)
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=2))
        return 0
    lo, hi = result.gain_interval
    if result.metric == "accuracy":
        gain = (f"cross-validated gain {100 * result.gain:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}] "
                f"(plain {100 * result.plain_score:.1f}%)")
    else:
        gain = (f"cross-validated NLL/token reduction {result.gain:+.4f} [{lo:+.4f}, {hi:+.4f}] "
                f"(plain {result.plain_score:.4f})")
    if result.kept_plain:
        print(f"rtd tune on {len(rows)} rows, {result.folds} folds: kept the plain model (lambda 0); {gain}")
    else:
        how = "a gate, ceiling" if result.gate is not None else "lambda"
        print(f"rtd tune on {len(rows)} rows, {result.folds} folds: k={result.k} "
              f"temperature={result.temperature:.4g} {how} {result.lam:g}; {gain}")
    print(f"saved as the defaults of {path}")
    return 0
