"""Checks of the plain (non-tensor) arguments that the ops, the modules and the helpers share, and how
an error names the type of a value it rejects."""

from __future__ import annotations

import numbers

try:
    import numpy
except ImportError:  # torch runs without numpy; then no numpy bool can reach a check
    numpy = None

# numpy's bool (what comparing numpy values gives) is a bool in all but its type.
BOOL_TYPES = (bool,) if numpy is None else (bool, numpy.bool_)


def type_name(value) -> str:
    """The type of `value` as an error names it: a builtin by its name, any other type qualified by
    its module ("numpy.bool", never a bare "bool" that reads as Python's own); None as None."""
    if value is None:
        return "None"
    kind = type(value)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def check_flag(name: str, value) -> bool:
    """value as a Python bool: a bool or a numpy bool, nothing merely truthy."""
    if not isinstance(value, BOOL_TYPES):
        raise TypeError(f"{name} must be a bool, got {type_name(value)}")
    return bool(value)


def check_int(name: str, value, minimum: int = 1) -> int:
    """value as a Python int >= minimum: any integral number (numpy's too), never a bool."""
    if isinstance(value, BOOL_TYPES) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type_name(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return int(value)
