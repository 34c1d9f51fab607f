"""Argument checks: each returns the value it accepts and otherwise raises a one-line ValueError that names the
argument, what it must be and what it got.

``name`` is the argument as the caller knows it, with its command-line option where there is one
(``"lam (--sdc-lambda)"``). Booleans are refused where a number is asked for.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")
SEED_BOUND = 2**63  # seeds are integers in [0, SEED_BOUND): distinct seeds give distinct 64-bit generator seeds


def shown(value: Any) -> str:
    """``repr(value)`` on one line of at most 80 characters (an array or tensor as its dtype and shape)."""
    if type(value).__name__ in ("Tensor", "ndarray"):
        return f"a {value.dtype} {type(value).__name__} of shape {tuple(value.shape)}"
    text = " ".join(repr(value).split())
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def boolean(name: str, value: Any) -> bool:
    """``value`` if it is True or False (not an int standing for one)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {shown(value)}")
    return value


def integer(name: str, value: Any) -> int:
    """``value`` if it is an integer."""
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {shown(value)}")
    return value


def positive_int(name: str, value: Any) -> int:
    """``value`` if it is an integer >= 1."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {shown(value)}")
    return value


def nonnegative_int(name: str, value: Any) -> int:
    """``value`` if it is an integer >= 0."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {shown(value)}")
    return value


def seed_value(name: str, value: Any) -> int:
    """``value`` if it is an integer in [0, 2**63): a seed (a larger one would wrap to a smaller one's 64 bits)."""
    if not _is_int(value) or not 0 <= value < SEED_BOUND:
        raise ValueError(f"{name}: expected an integer in [0, 2**63), got {shown(value)}")
    return value


def finite(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite number."""
    if not _is_finite(value):
        raise ValueError(f"{name} must be a finite number, got {shown(value)}")
    return float(value)


def positive_float(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite number > 0."""
    if not _is_finite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {shown(value)}")
    return float(value)


def nonnegative_float(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite number >= 0."""
    if not _is_finite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {shown(value)}")
    return float(value)


def open_fraction(name: str, value: Any) -> float:
    """``value`` as a float if it is a number strictly between 0 and 1."""
    if not _is_finite(value) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {shown(value)}")
    return float(value)


def fraction(name: str, value: Any) -> float:
    """``value`` as a float if it is a number in [0, 1)."""
    if not _is_finite(value) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {shown(value)}")
    return float(value)


def one_of(name: str, value: T, choices: Iterable[Any]) -> T:
    """``value`` if it is one of ``choices`` (listed in the error in their order)."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {shown(value)}")
    return value


def choice(choices: Iterable[Any]) -> Callable[[str, Any], Any]:
    """:func:`one_of` ``choices`` as a check of ``(name, value)``."""
    choices = list(choices)
    return lambda name, value: one_of(name, value, choices)


def text(name: str, value: Any) -> str:
    """``value`` if it is a non-empty string."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {shown(value)}")
    return value


def optional(check: Callable[[str, Any], T]) -> Callable[[str, Any], T | None]:
    """``check`` that also accepts None (and returns it)."""
    return lambda name, value: None if value is None else check(name, value)


def list_of(check: Callable[[str, Any], T], length: int | None = None) -> Callable[[str, Any], list[T]]:
    """A check of a list (or tuple) whose every item passes ``check`` (named ``name[i]``), of ``length`` items
    when given; it returns the checked items as a list."""

    def checked(name: str, value: Any) -> list[T]:
        if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length):
            raise ValueError(f"{name} must be a list{'' if length is None else f' of {length} items'}, got "
                             f"{shown(value)}")
        return [check(f"{name}[{i}]", item) for i, item in enumerate(value)]

    return checked


def path(name: str, value: Any) -> str:
    """``value`` as a string if it is a non-empty path (``str`` or ``os.PathLike``)."""
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(f"{name} must be a path, got {value!r}")
    return os.fspath(value)
