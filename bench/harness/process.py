"""A harness module run as a script in a fresh process: ``python -m harness.MODULE ARGS``, with ``bench/`` on the
child's path and the caller's working folder (so that it imports the same fastdd a caller in the repository root
imports)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]


def run_module(module: str, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``harness.<module>`` with ``args`` to its end, its output captured as text; with ``check``,
    CalledProcessError when it fails."""
    path = os.pathsep.join([str(BENCH), *filter(None, [os.environ.get("PYTHONPATH")])])
    return subprocess.run([sys.executable, "-m", f"harness.{module}", *args], capture_output=True, text=True,
                          check=check, env={**os.environ, "PYTHONPATH": path})
