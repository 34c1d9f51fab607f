"""The distillers, by name."""

from __future__ import annotations

from fastdd.methods.base import Distiller, Plugin
from fastdd.methods.datm import DATM
from fastdd.methods.dc import DC, DSADistiller, get_loops
from fastdd.methods.dcc import DCC, DSAC
from fastdd.methods.dm import DM
from fastdd.methods.ftd import FTD
from fastdd.methods.idc import IDC
from fastdd.methods.mtt import MTT

METHODS: dict[str, type[Distiller]] = {"dc": DC, "dsa": DSADistiller, "dcc": DCC, "dsac": DSAC, "dm": DM, "idc": IDC,
                                       "mtt": MTT, "ftd": FTD, "datm": DATM}


def get_distiller(method: str) -> type[Distiller]:
    """The Distiller class of ``method`` (one of METHODS)."""
    try:
        return METHODS[method]
    except KeyError:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}") from None


__all__ = ["DATM", "DC", "DCC", "DM", "DSAC", "DSADistiller", "Distiller", "FTD", "IDC", "METHODS", "MTT", "Plugin",
           "get_distiller", "get_loops"]
