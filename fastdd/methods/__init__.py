"""The distillers. Importing the package registers the built-in ones (:mod:`fastdd.registry`): each method's
module registers its :class:`MethodSpec`; the plug-ins register from :mod:`fastdd.plugins`."""

from __future__ import annotations

# isort: off
# the built-in methods register in this order: the order of --help and of the messages that list them
from fastdd.methods import dc, dcc, dm, idc, mtt, ftd, datm  # noqa: F401
# isort: on
from fastdd.methods.base import Distiller
from fastdd.methods.datm import DATM
from fastdd.methods.dc import DC, DSADistiller, get_loops
from fastdd.methods.dcc import DCC, DSAC
from fastdd.methods.dm import DM
from fastdd.methods.ftd import FTD
from fastdd.methods.idc import IDC
from fastdd.methods.mtt import MTT
from fastdd.plugins.protocol import Plugin, RunInfo, StepContext
from fastdd.registry import MethodSpec, method_spec, register_method, register_plugin


def get_distiller(method: str) -> type[Distiller]:
    """The Distiller class of registered method ``method`` (a one-line ValueError listing them otherwise)."""
    return method_spec(method).distiller


__all__ = ["DATM", "DC", "DCC", "DM", "DSAC", "DSADistiller", "Distiller", "FTD", "IDC", "MTT", "MethodSpec",
           "Plugin", "RunInfo", "StepContext", "get_distiller", "get_loops", "method_spec", "register_method",
           "register_plugin"]
