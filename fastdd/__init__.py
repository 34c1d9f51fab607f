"""fastdd: fast dataset distillation. The API (docs/api.md): ``RunConfig``, ``distill``, ``evaluate``, ``plan``."""

__version__ = "0.1.0"  # before the imports below: the modules they load read it

from fastdd.api import DistillResult, EvalResult, PlanResult, distill, evaluate, plan  # noqa: E402
from fastdd.config import RunConfig  # noqa: E402

__all__ = ["DistillResult", "EvalResult", "PlanResult", "RunConfig", "__version__", "distill", "evaluate", "plan"]
