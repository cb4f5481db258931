"""The distribution QAlign's chain proposes from and its baselines sample:
the model's own, at temperature 1. Its options are
:class:`slot_cpp.options.SamplingOptions`, with the defaults of
:data:`PROPOSAL`, defined here once."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from ..options import SamplingOptions

PROPOSAL = SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0)
"""QAlign's proposal and its baselines' sampling: the model's own
distribution (temperature 1, no top-k, top-p or min-p truncation, no
penalties), which the chain's acceptance rule assumes, seeded with 0 by
default. ``top_k``, ``grammar``, ``json_schema`` and ``logit_bias``
restrict or shape it (the chain then targets that distribution), and
``max_tokens`` (256, the group's default) and ``stop`` end an answer."""

FIXED = ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty", "ignore_eos")
"""The sampling options the proposal keeps at PROPOSAL's values."""

SAMPLING_NAMES = frozenset(f.name for f in dataclasses.fields(SamplingOptions))


def proposal_options(sampling: Optional[SamplingOptions], overrides: Mapping[str, Any]) -> SamplingOptions:
    """``sampling`` (default :data:`PROPOSAL`) with ``overrides`` (fields of
    SamplingOptions), checked to be a proposal QAlign can sample: the
    options of :data:`FIXED` keep PROPOSAL's values, and a seed of None is 0."""
    base = PROPOSAL if sampling is None else sampling
    if not isinstance(base, SamplingOptions):
        raise TypeError(f"sampling must be a slot_cpp.options.SamplingOptions, got {type(base).__name__}")
    group = base.replace(**overrides) if overrides else base
    for name in FIXED:
        if getattr(group, name) != getattr(PROPOSAL, name):
            raise ValueError(f"QAlign samples the model's own distribution: {name} must be "
                             f"{getattr(PROPOSAL, name)!r}, got {getattr(group, name)!r} "
                             "(start from slot_cpp.qalign.PROPOSAL)")
    if group.seed is None:
        group = group.replace(seed=0)
    return group


def split_sampling(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword options -> (SamplingOptions fields, the rest)."""
    sampling = {k: v for k, v in options.items() if k in SAMPLING_NAMES}
    return sampling, {k: v for k, v in options.items() if k not in SAMPLING_NAMES}
