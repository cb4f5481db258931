"""Every request option, defined once.

An option is a field of one of the groups below: its type, default, range and
documentation are written here and nowhere else. The other faces derive from
these definitions:

- the Python API: :meth:`slot_cpp.Model.generate_with_slot`,
  :meth:`~slot_cpp.Model.generate_batch` and :meth:`~slot_cpp.Model.stream`
  take every field as a keyword argument (or a whole group, ``slot=SlotOptions(...)``);
- the command line: :func:`add_arguments` turns a group into flags and
  :func:`group_from_arguments` reads the group back, once;
- the HTTP server: :func:`request_model` turns a group into the pydantic model
  of its request-body object (ranges and enums included, so the OpenAPI schema
  describes them), and :func:`group_from_http` reads the group back, once;
- the native request: :func:`native_request` fills ``_core.Request`` from the
  groups, the one place where options meet the C++ core.

The same machinery defines the settings of a Model (:class:`ModelSettings`)
and of a server (:class:`ServerSettings`): ``serve``'s flags, the server's
configuration and ``Model(...)`` share one definition.

The modules: ``spec`` (the checks and :class:`OptionSpec`), ``groups``,
``native``, ``cli`` and ``http``; this package re-exports their names.

Each group checks its own values when it is made (``ValueError`` or
``TypeError`` naming the option). Checks that need the model (token ids
inside the vocabulary, delta's length) run in :func:`native_request`.
"""

from __future__ import annotations

from .cli import (add_arguments, dest_of, flag_of, from_arguments, group_from_arguments, parse_list,
                  parse_lr)
from .groups import (GROUPS, REASONING_FORMATS, ChatOptions, LmcorOptions, ModelSettings, QAlignOptions, RequestExtras, RtdOptions,
                     SamplingOptions, ServerSettings, SlotOptions, split_options)
from .http import from_http, group_from_http, http_default, http_fields, request_model
from .native import ModelFacts, check_delta, check_tokens, lora_scales, native_request, schema_grammar
from .spec import AUTO_LR_REFERENCE, SAME, OptionSpec, check_float, check_int, specs

__all__ = [
    "AUTO_LR_REFERENCE",
    "ChatOptions",
    "GROUPS",
    "LmcorOptions",
    "ModelFacts",
    "ModelSettings",
    "OptionSpec",
    "QAlignOptions",
    "REASONING_FORMATS",
    "RequestExtras",
    "RtdOptions",
    "SAME",
    "SamplingOptions",
    "ServerSettings",
    "SlotOptions",
    "add_arguments",
    "check_delta",
    "check_float",
    "check_int",
    "check_tokens",
    "dest_of",
    "flag_of",
    "from_arguments",
    "from_http",
    "group_from_arguments",
    "group_from_http",
    "http_default",
    "http_fields",
    "lora_scales",
    "native_request",
    "parse_list",
    "parse_lr",
    "request_model",
    "schema_grammar",
    "specs",
    "split_options",
]
