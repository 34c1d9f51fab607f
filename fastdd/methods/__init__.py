"""The distillers. Importing the package registers the built-in ones (:mod:`fastdd.registry`): each method's
module registers its :class:`MethodSpec`; the plug-ins register from :mod:`fastdd.plugins`."""

from __future__ import annotations

from collections.abc import Callable

# isort: off
# the built-in methods register in this order: the order of --help and of the messages that list them
from fastdd.methods import dc, dcc, dm, idc, mtt, ftd, datm  # noqa: F401
# isort: on
from fastdd.methods.base import Distiller
from fastdd.methods.datm import DATM
from fastdd.methods.dc import DC, get_loops
from fastdd.methods.dcc import DCC
from fastdd.methods.dm import DM
from fastdd.methods.ftd import FTD
from fastdd.methods.idc import IDC
from fastdd.methods.mtt import MTT
from fastdd.plugins.protocol import Plugin, RunInfo, StepContext
from fastdd.registry import MethodSpec, method_spec, register_method, register_plugin


def get_distiller(method: str) -> Callable[..., Distiller]:
    """What builds registered method ``method``'s distiller (:attr:`MethodSpec.builder`: its Distiller class, with
    the spec's fixed arguments when it has any); a one-line ValueError listing the methods otherwise."""
    return method_spec(method).builder


__all__ = ["DATM", "DC", "DCC", "DM", "Distiller", "FTD", "IDC", "MTT", "MethodSpec",
           "Plugin", "RunInfo", "StepContext", "get_distiller", "get_loops", "method_spec", "register_method",
           "register_plugin"]
