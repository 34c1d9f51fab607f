"""fastdd: fast dataset distillation. The API (docs/api.md): ``RunConfig``, ``distill``, ``evaluate``, ``plan``."""

from fastdd.api import DistillResult, EvalResult, PlanResult, distill, evaluate, plan
from fastdd.config import RunConfig
from fastdd.version import __version__

__all__ = ["DistillResult", "EvalResult", "PlanResult", "RunConfig", "__version__", "distill", "evaluate", "plan"]
