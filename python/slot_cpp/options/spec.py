"""The option specification: the checks every face shares, :class:`OptionSpec`
(how one option is checked and shown on each face) and the group base."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np


# lr="auto": the step size of the reference run whose direction the KL trust
# region scales (the C++ optimiser's calibration reads it from the request).
AUTO_LR_REFERENCE = 0.003


# ---- checks shared by every face ------------------------------------------------


def check_int(name: str, value: Any, minimum: int, maximum: Optional[int] = None) -> int:
    """``value`` as an int in [minimum, maximum], or a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def check_float(name: str, value: Any, *, low: float, high: float = math.inf,
                low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float inside the interval, or a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value}")
    bad_low = v <= low if low_open else v < low
    bad_high = v >= high if high_open else v > high
    if bad_low or bad_high:
        left = "(" if low_open else "["
        right = ")" if high_open or high == math.inf else "]"
        raise ValueError(f"{name} must be in {left}{low}, {high}{right}, got {value}")
    return v


# ---- the option specification ------------------------------------------------

SAME = "<same>"
"""http_default's value when the HTTP default is the Python one."""


@dataclass(frozen=True)
class OptionSpec:
    """How one option is checked and shown on each face."""

    doc: str
    kind: str
    """int, float, bool, str (one of choices), text (any str), lr (a float or 'auto'), strings (a list of str), bias (token id -> logit
    bias, as OpenAI's logit_bias), grammar (GBNF text; a file on the command line), schema (a JSON
    schema: a mapping, a pydantic model class or JSON text; a file on the command line), json (a JSON
    object: a mapping or JSON text, kept as JSON text), lora (adapter id -> scale), kv (GGUF metadata overrides), or object (Python only)."""
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False
    """None is allowed (it means: take the default from elsewhere, as documented)."""
    flag: Optional[str] = ""
    """The command-line flag ('' derives --name-with-dashes; None: not on the command line)."""
    short: Optional[str] = None
    http: Optional[str] = ""
    """The name in the HTTP request body ('' is the field name; None: not in the HTTP schema)."""
    http_default: Any = SAME
    """The HTTP default where the OpenAI protocol defines another one than the Python API."""
    http_high: Optional[float] = None
    """A tighter upper bound a server puts on a request (a cost cap)."""
    native: Optional[str] = ""
    """The field of ``_core.Request`` ('' is the field name; None: converted by hand in native_request)."""
    dest: str = ""
    """The command line's argparse dest ('' derives it from the field name)."""

    def check(self, name: str, value: Any) -> Any:
        if value is None:
            if self.optional:
                return None
            raise TypeError(f"{name} must not be None")
        if self.kind == "bool":
            return bool(value)
        if self.kind == "lr" and isinstance(value, str):
            if value != "auto":
                raise ValueError(f"{name} must be a number > 0 or 'auto', got {value!r}")
            return value
        if self.kind == "int":
            return check_int(name, value, int(self.low if self.low is not None else -(2**63)),
                             None if self.high is None else int(self.high))
        if self.kind in ("float", "lr"):
            return check_float(name, value, low=-math.inf if self.low is None else self.low,
                               high=math.inf if self.high is None else self.high,
                               low_open=self.low_open, high_open=self.high_open)
        if self.kind == "text":
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a str, got {type(value).__name__}")
            return value
        if self.kind == "str":
            if value not in self.choices:
                raise ValueError(f"{name} must be " + " or ".join(repr(c) for c in self.choices) + f", got {value!r}")
            return str(value)
        if self.kind == "bias":
            items = value.items() if isinstance(value, Mapping) else value
            if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
                raise TypeError(f"{name} must map token ids to biases")
            out: dict[int, float] = {}
            for pair in items:
                if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                    raise TypeError(f"{name} must map token ids to biases")
                key, bias = pair
                if isinstance(key, str) and key.strip().isdigit():
                    key = int(key)
                if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or key < 0:
                    raise ValueError(f"{name} keys must be token ids (ints >= 0), got {key!r}")
                out[int(key)] = check_float(f"{name}[{key}]", bias, low=-100.0, high=100.0)
            return tuple(sorted(out.items()))
        if self.kind == "grammar":  # parsed by llama.cpp's grammar sampler; "" would read as no grammar there
            if not isinstance(value, str):
                raise TypeError(f"{name} must be GBNF text (a str), got {type(value).__name__}")
            if not value.strip():
                raise ValueError(f"{name} is empty")
            return value
        if self.kind == "schema":
            return _schema_text(name, value)
        if self.kind == "json":
            return _object_text(name, value)
        if self.kind == "lora":
            return _lora_scales(name, value)
        if self.kind == "kv":
            return _kv_overrides(name, value)
        if self.kind == "strings":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, Sequence):
                raise TypeError(f"{name} must be a str or a list of str")
            items = tuple(value)
            for item in items:
                if not isinstance(item, str) or item == "":
                    raise ValueError(f"{name} must be a list of non-empty strings")
            return items
        return value

    def range_text(self) -> str:
        if self.kind == "str":
            return " | ".join(self.choices)
        if self.low is None and self.high is None:
            return ""
        left = "(" if self.low_open else "["
        right = ")" if self.high_open or self.high is None else "]"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"{left}{low}, {high}{right}"


def _json_mapping(name: str, value: Any, what: str) -> Mapping[str, Any]:
    """A mapping given as itself or as JSON text (TypeError/ValueError naming ``name`` and ``what`` it must be)."""
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    return value


def _schema_text(name: str, value: Any) -> str:
    """A JSON schema given as a mapping, a pydantic model class or JSON text, as JSON text."""
    if isinstance(value, type) and hasattr(value, "model_json_schema"):
        value = value.model_json_schema()
    value = _json_mapping(name, value, "a JSON schema (a mapping, a pydantic model class or JSON text)")
    try:
        return json.dumps(value, sort_keys=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} is not JSON-serialisable: {exc}") from None


def _lora_scales(name: str, value: Any) -> tuple[tuple[int, float], ...]:
    """LoRA scales as (adapter id, scale) pairs: a mapping id -> scale, or
    llama-server's list of {"id": ..., "scale": ...}."""
    items = value.items() if isinstance(value, Mapping) else value
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(f"{name} must map adapter ids to scales, or be a list of {{'id': ..., 'scale': ...}}")
    out: dict[int, float] = {}
    for item in items:
        if isinstance(item, Mapping):
            if set(item) != {"id", "scale"}:
                raise ValueError(f"{name} entries must be {{'id': ..., 'scale': ...}}")
            item = (item["id"], item["scale"])
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"{name} must map adapter ids to scales")
        key = check_int(f"{name} id", item[0], 0)
        if key in out:
            raise ValueError(f"{name} names adapter {key} twice")
        out[key] = check_float(f"{name}[{key}] scale", item[1], low=-math.inf)
    return tuple(sorted(out.items()))


def _kv_overrides(name: str, value: Any) -> tuple[tuple[str, str, str], ...]:
    """GGUF metadata overrides as (key, type, value text): a mapping key ->
    int, float, bool or str, or llama.cpp's KEY=TYPE:VALUE strings."""
    out: list[tuple[str, str, str]] = []
    if isinstance(value, Mapping):
        for key, v in value.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"{name} keys must be non-empty str")
            if isinstance(v, bool):
                out.append((key, "bool", "true" if v else "false"))
            elif isinstance(v, (int, np.integer)):
                out.append((key, "int", str(int(v))))
            elif isinstance(v, (float, np.floating)):
                out.append((key, "float", repr(float(v))))
            elif isinstance(v, str):
                out.append((key, "str", v))
            else:
                raise TypeError(f"{name}[{key!r}] must be an int, float, bool or str, got {type(v).__name__}")
        return tuple(out)
    if isinstance(value, str) or not isinstance(value, Iterable):
        value = [value]
    for item in value:
        key, sep, rest = str(item).partition("=")
        kind, colon, text = rest.partition(":")
        if not sep or not colon or not key or kind not in ("int", "float", "bool", "str"):
            raise ValueError(f"{name} must be KEY=TYPE:VALUE with TYPE int, float, bool or str, got {item!r}")
        out.append((key, kind, text))
    return tuple(out)


def _object_text(name: str, value: Any) -> str:
    """A JSON object given as a mapping or JSON text, as JSON text."""
    value = _json_mapping(name, value, "a JSON object (a mapping)")
    try:
        return json.dumps(dict(value))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} is not JSON-serialisable: {exc}") from None


def _opt(default: Any, doc: str, kind: str, *, factory: Any = None, **spec: Any) -> Any:
    s = OptionSpec(doc=doc, kind=kind, **spec)
    if isinstance(default, (list, dict, set)):
        raise TypeError("option defaults must be immutable")
    if factory is not None:
        return field(default_factory=factory, metadata={"spec": s})
    if default is dataclasses.MISSING:
        return field(metadata={"spec": s})
    return field(default=default, metadata={"spec": s})


class _Group:
    """Checks every field on construction, through its spec."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            spec: OptionSpec = f.metadata["spec"]
            object.__setattr__(self, f.name, spec.check(self._label(f.name), getattr(self, f.name)))
        self._check_together()

    _prefix = ""

    def _label(self, name: str) -> str:
        spec: OptionSpec = self.__dataclass_fields__[name].metadata["spec"]  # type: ignore[attr-defined]
        return self._prefix + (spec.http or name)

    def _check_together(self) -> None:
        """Rules that tie several fields of the group."""

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def replace(self, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]



def specs(group: type) -> Iterator[tuple[str, Any, OptionSpec]]:
    """(name, default, spec) of every option of a group."""
    for f in dataclasses.fields(group):
        default = f.default
        if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        yield f.name, default, f.metadata["spec"]
