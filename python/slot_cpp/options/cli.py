"""The command line: a group's options as flags, and the group read back from them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from .spec import OptionSpec, specs


def parse_lr(text: str) -> Union[float, str]:
    """A SLOT step size on the command line: a number, or 'auto'."""
    if text.strip() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from exc


def parse_list(item: Callable[[str], Any], what: str) -> Callable[[str], list[Any]]:
    """An argparse type for comma-separated values of ``item``."""
    def parse(text: str) -> list[Any]:
        try:
            return [item(x.strip()) for x in text.split(",") if x.strip()]
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from exc
    return parse


def _parse_bias(text: str) -> tuple[int, float]:
    token, sep, bias = text.partition("=")
    try:
        if not sep:
            raise ValueError(text)
        return int(token), float(bias)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected TOKEN=BIAS (a token id and a number), got {text!r}") from exc


_CLI_TYPES: dict[str, tuple[Callable[[str], Any], str]] = {
    "int": (int, "integers"), "text": (str, "strings"), "float": (float, "numbers"), "lr": (parse_lr, "numbers or 'auto'"),
    "json": (str, "JSON objects"),
}


def _read_text_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc}") from None


def flag_of(name: str, spec: OptionSpec) -> Optional[str]:
    if spec.flag is None:
        return None
    return spec.flag or "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, group: type, *, only: Optional[Sequence[str]] = None,
                  exclude: Sequence[str] = (), lists: Sequence[str] = (),
                  defaults: Optional[Mapping[str, Any]] = None, prefix: str = "", dest_prefix: str = "") -> None:
    """Add a group's options to ``parser`` as flags. Options named in ``lists``
    take comma-separated values (a sweep); ``defaults`` overrides a default for
    this command; ``prefix`` names the flags (``--slot-steps``) and their
    dests; ``dest_prefix`` the dests alone."""
    for name, default, spec in specs(group):
        flag = flag_of(name, spec)
        if flag is None or name in exclude or (only is not None and name not in only):
            continue
        if prefix:
            flag = "--" + prefix + flag[2:]
        if defaults and name in defaults:
            default = defaults[name]
        dest = dest_of(name, spec, prefix=prefix, dest_prefix=dest_prefix)
        shown = default not in (None, (), False) and spec.kind != "text"  # no API key in --help
        help_text = spec.doc + (f" (default: {default})" if shown else "")
        names = [flag] + ([spec.short] if spec.short and not prefix else [])
        metavar = flag.lstrip("-").upper().replace("-", "_")
        if spec.kind == "bool":
            parser.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction, default=default,
                                help=spec.doc)
        elif spec.kind == "strings":
            parser.add_argument(*names, dest=dest, action="append", default=[], metavar=metavar,
                                help=spec.doc + " (repeatable)")
        elif spec.kind == "str":
            parser.add_argument(*names, dest=dest, choices=spec.choices, default=default, help=help_text)
        elif spec.kind == "kv":
            parser.add_argument(*names, dest=dest, action="append", default=None, metavar="KEY=TYPE:VALUE",
                                help=spec.doc + " (repeatable)")
        elif spec.kind == "bias":
            parser.add_argument(*names, dest=dest, action="append", type=_parse_bias, default=None,
                                metavar="TOKEN=BIAS", help=spec.doc + " (repeatable)")
        elif spec.kind in ("grammar", "schema"):
            parser.add_argument(*names, dest=dest, type=_read_text_file, default=None, metavar="FILE",
                                help=spec.doc + " (read from FILE)")
        else:
            parse, what = _CLI_TYPES[spec.kind]
            if name in lists:
                parser.add_argument(*names, dest=dest, type=parse_list(parse, what), metavar=metavar,
                                    default=list(default) if isinstance(default, (list, tuple)) else [default],
                                    help=spec.doc + " (comma-separated: each value is a setting)")
            else:
                parser.add_argument(*names, dest=dest, type=parse, default=default, metavar=metavar, help=help_text)


def from_arguments(args: argparse.Namespace, group: type, *, prefix: str = "",
                   dest_prefix: str = "") -> dict[str, Any]:
    """The keyword arguments of a group that ``add_arguments`` put on ``args``."""
    out = {}
    for name, _, spec in specs(group):
        dest = dest_of(name, spec, prefix=prefix, dest_prefix=dest_prefix)
        if hasattr(args, dest):
            out[name] = getattr(args, dest)
    return out


def group_from_arguments(args: argparse.Namespace, group: type, *, prefix: str = "", dest_prefix: str = "",
                         **given: Any) -> Any:
    """The group itself, made once from its flags on ``args``; ``given``
    sets the options that come from elsewhere (another flag, the command)."""
    return group(**{**from_arguments(args, group, prefix=prefix, dest_prefix=dest_prefix), **given})


def dest_of(name: str, spec: OptionSpec, *, prefix: str = "", dest_prefix: str = "") -> str:
    """The argparse dest of an option's flag."""
    return dest_prefix + prefix.replace("-", "_") + (spec.dest or name)

