"""RTD's settings for one request, resolved against a datastore's defaults."""

from __future__ import annotations

from dataclasses import dataclass

from .. import _core
from .._model import Model
from ..options import RtdOptions, specs


@dataclass(frozen=True)
class RTD(RtdOptions):
    """RTD settings for one request: ``rtd=RTD(store, k=..., temperature=..., lam=...)``.
    Settings left None take the datastore's defaults (``Datastore.defaults``);
    the options themselves are defined in :class:`slot_cpp.options.RtdOptions`."""

    def __post_init__(self) -> None:
        # The settings are checked once they are resolved against the
        # datastore's defaults, when the request is made (see _apply).
        pass

    def resolved(self) -> "RTD":
        d = self.datastore.defaults
        return RTD(self.datastore, self.k if self.k is not None else int(d["k"]),
                   self.temperature if self.temperature is not None else float(d["temperature"]),
                   self.lam if self.lam is not None else float(d["lam"]),
                   self.nprobe if self.nprobe is not None else int(d.get("nprobe", 0)))

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
