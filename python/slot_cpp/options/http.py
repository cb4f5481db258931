"""The HTTP schema: a group's options as pydantic fields, and the group read back from a body."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal, Mapping, Optional, Sequence, Union

from .spec import SAME, OptionSpec, specs


def http_default(name: str, default: Any, spec: OptionSpec) -> Any:
    return default if spec.http_default == SAME else spec.http_default


def http_fields(group: type, *, only: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """pydantic field definitions of a group's HTTP options: their types,
    ranges (with a server's tighter caps), enums, descriptions and the
    protocol's defaults. Options without an HTTP name are left out."""
    from pydantic import AfterValidator, Field

    fields: dict[str, Any] = {}
    for field_name, default, spec in specs(group):
        if spec.http is None or (only is not None and field_name not in only):
            continue
        constraints: dict[str, Any] = {}
        if spec.low is not None:
            constraints["gt" if spec.low_open else "ge"] = spec.low
        high = spec.http_high if spec.http_high is not None else spec.high
        if high is not None:
            constraints["lt" if spec.high_open and spec.http_high is None else "le"] = high
        annotation: Any
        if spec.kind in ("int", "float"):
            annotation = int if spec.kind == "int" else float
        elif spec.kind == "bool":
            annotation, constraints = bool, {}
        elif spec.kind == "str":
            annotation, constraints = Literal[spec.choices], {}  # type: ignore[valid-type]
        elif spec.kind == "bias":
            # OpenAI's shape (token id strings -> bias), checked by the option's own rule.
            annotation = Annotated[dict[str, float], AfterValidator(lambda v, c=spec, n=field_name: c.check(n, v))]
            constraints = {}
        elif spec.kind == "lora":
            # llama-server's shape: [{"id": 0, "scale": 0.5}, ...], checked by the option's own rule.
            annotation = Annotated[list[dict[str, Any]], AfterValidator(lambda v, c=spec, n=field_name: c.check(n, v))]
            constraints = {}
        elif spec.kind == "grammar":
            annotation, constraints = str, {}
        elif spec.kind in ("schema", "json"):
            # A JSON object, kept as JSON text once checked.
            annotation = Annotated[dict[str, Any], AfterValidator(lambda v, c=spec, n=field_name: c.check(n, v))]
            constraints = {}
        elif spec.kind == "lr":
            # A number or "auto": checked by the option's own rule (with the
            # server's cap), so that an error names the field, not a branch.
            capped = dataclasses.replace(spec, high=high)
            label = spec.http or field_name
            annotation = Annotated[Union[Literal["auto"], float],
                                   AfterValidator(lambda v, c=capped, n=label: c.check(n, v))]
            constraints = {}
        else:
            raise TypeError(f"{group.__name__}.{field_name} ({spec.kind}) has no HTTP form")
        if spec.optional:
            annotation = Optional[annotation]
        description = spec.doc
        if spec.kind == "lr":
            description += f" (a number in {dataclasses.replace(spec, high=high).range_text()})"
        fields[field_name] = (annotation, Field(http_default(field_name, default, spec), description=description,
                                                alias=spec.http or None, **constraints))
    return fields


def from_http(body: Any, group: type) -> dict[str, Any]:
    """The group's options a request body (made by http_fields) carries."""
    return {name: getattr(body, name) for name, _, spec in specs(group)
            if spec.http is not None and hasattr(body, name)}


def group_from_http(body: Any, group: type, **given: Any) -> Any:
    """The group itself, made once from a request body (or an extension
    object of it); ``given`` sets the options the server decides."""
    return group(**{**from_http(body, group), **given})


def request_model(name: str, fields: Mapping[str, Any], *, base: type, doc: Optional[str] = None) -> type:
    """A pydantic model named ``name`` with these field definitions."""
    from pydantic import create_model

    model = create_model(name, __base__=base, **dict(fields))
    if doc:
        model.__doc__ = doc
    return model
