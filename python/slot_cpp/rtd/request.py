"""RTD's settings for one request, resolved against a datastore's defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from .. import _core
from .._model import Model
from ..options import RtdOptions, specs

GATE_FEATURES = ("bias", "distance", "top_mass")
"""The gate's weights: gate(q) = sigmoid(bias + distance * nearest(q) / scale + top_mass * max_v r(v)),
nearest(q) the distance to the nearest key (heads times the heads' mean) and scale the datastore's
typical distance from a key to its nearest other key."""

DEFAULT_GATE = {"bias": 6.0, "distance": -3.0, "top_mass": 0.0}
"""The gate of a datastore not tuned yet: open (0.95) at the typical nearest distance, half at
twice it, 0.05 at three times it."""


def check_gate(gate: Any) -> dict[str, float]:
    """A gate's weights, checked: a mapping of GATE_FEATURES to finite numbers."""
    if not isinstance(gate, Mapping) or set(gate) != set(GATE_FEATURES):
        raise ValueError(f"an rtd gate maps {', '.join(GATE_FEATURES)} to numbers, got {gate!r}")
    out = {}
    for name in GATE_FEATURES:
        value = gate[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"rtd gate {name} must be a finite number, got {value!r}")
        out[name] = float(value)
    return out


@dataclass(frozen=True)
class RTD(RtdOptions):
    """RTD settings for one request: ``rtd=RTD(store, k=..., temperature=..., lam=..., gate=...)``.
    Settings left None take the datastore's defaults (``Datastore.defaults``);
    the options themselves are defined in :class:`slot_cpp.options.RtdOptions`."""

    def __post_init__(self) -> None:
        # The settings are checked once they are resolved against the
        # datastore's defaults, when the request is made (see _apply).
        pass

    def resolved(self) -> "RTD":
        d = self.datastore.defaults
        return RTD(self.datastore, k=self.k if self.k is not None else int(d["k"]),
                   temperature=self.temperature if self.temperature is not None else float(d["temperature"]),
                   lam=self.lam if self.lam is not None else float(d["lam"]),
                   nprobe=self.nprobe if self.nprobe is not None else int(d.get("nprobe", 0)),
                   gate=self.gate if self.gate is not None else d.get("gate") is not None)

    def _apply(self, model: Model, request: _core.Request) -> None:
        """Checks the resolved settings and sets them on a native request."""
        r = self.resolved()
        store = r.datastore
        index = store.index(model)  # checks the model first
        checked = RtdOptions(**r.as_dict())
        assert checked.k is not None
        if checked.k > len(store):
            raise ValueError(f"rtd k ({checked.k}) is larger than the datastore ({len(store)} keys)")
        request.rtd = index
        for name, _, spec in specs(RtdOptions):
            if spec.native:
                setattr(request, spec.native, getattr(checked, name))
        if request.rtd_nprobe > 0 and not store.has_ivf:
            raise ValueError("rtd nprobe needs an inverted-file index (Datastore.build_ivf)")
        request.rtd_gate = bool(checked.gate)
        if checked.gate:
            weights, scale = store.gate_settings(model)
            request.rtd_gate_bias = weights["bias"]
            request.rtd_gate_distance = weights["distance"]
            request.rtd_gate_top_mass = weights["top_mass"]
            request.rtd_gate_scale = scale
