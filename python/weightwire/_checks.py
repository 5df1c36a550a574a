"""Argument checks shared by the public API: the wrong type is a TypeError, a bad value a
ValueError, and both name the argument."""

from __future__ import annotations

import math


def int_arg(value: object, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int within [minimum, maximum]; bools are not ints here."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def seconds_arg(value: object, name: str) -> float:
    """A finite, non-negative number of seconds: weightwire never waits without a deadline."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if not 0 <= seconds < math.inf:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return seconds
