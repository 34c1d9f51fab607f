"""The plug-ins: the protocol a plug-in implements (:mod:`fastdd.plugins.protocol`) and the built-in SDC and UDD.
Importing the package registers the built-in ones (:mod:`fastdd.registry`), in the order plug-ins named together
are applied in: SDC, then UDD."""

from __future__ import annotations

# isort: off
from fastdd.plugins import sdc, udd  # noqa: F401
# isort: on
from fastdd.plugins.protocol import Plugin, RunInfo, StepContext

__all__ = ["Plugin", "RunInfo", "StepContext"]
