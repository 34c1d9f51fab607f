"""The distillers, by name."""

from __future__ import annotations

from fastdd.methods.base import Distiller, Plugin
from fastdd.methods.dc import DC, DSADistiller, get_loops
from fastdd.methods.dm import DM
from fastdd.methods.idc import IDC
from fastdd.methods.mtt import MTT

METHODS: dict[str, type[Distiller]] = {"dc": DC, "dsa": DSADistiller, "dm": DM, "idc": IDC, "mtt": MTT}


def get_distiller(method: str) -> type[Distiller]:
    """The Distiller class of ``method`` (one of METHODS)."""
    try:
        return METHODS[method]
    except KeyError:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}") from None


__all__ = ["DC", "DM", "DSADistiller", "Distiller", "IDC", "METHODS", "MTT", "Plugin", "get_distiller", "get_loops"]
