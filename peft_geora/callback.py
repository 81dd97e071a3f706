"""``peft_geora.callback``: the import path of :class:`GeoRADiagnosticsCallback` (:mod:`peft_geora.diagnostics`)."""

from .diagnostics.callback import GeoRADiagnosticsCallback

__all__ = ["GeoRADiagnosticsCallback"]
