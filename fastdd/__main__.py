"""``python -m fastdd`` (and ``torchrun -m fastdd``): the ``fastdd`` command."""

import sys

from fastdd.cli import main

sys.exit(main())
