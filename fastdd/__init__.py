"""fastdd: fast dataset distillation. The API (docs/api.md): ``RunConfig``, ``distill``, ``evaluate``, ``plan``;
extending it (docs/extending.md): ``MethodSpec``, ``register_method``, ``option``, ``Plugin``, ``StepContext``,
``RunInfo``, ``register_plugin``."""

from fastdd.api import DistillResult, EvalResult, PlanResult, distill, evaluate, plan
from fastdd.config import RunConfig
from fastdd.plugins.protocol import Plugin, RunInfo, StepContext
from fastdd.registry import MethodSpec, option, register_method, register_plugin
from fastdd.version import __version__

__all__ = ["DistillResult", "EvalResult", "MethodSpec", "PlanResult", "Plugin", "RunConfig", "RunInfo", "StepContext",
           "__version__", "distill", "evaluate", "option", "plan", "register_method", "register_plugin"]
