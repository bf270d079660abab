"""Validators of the layers' and routers' plain arguments (ints, factors), shared so that every
error reads the same: the argument's name (prefixed with its owner, e.g. ``"MoEMlp: k"``), what
was given and what is allowed. Tensor arguments of the ops are checked in ``ops/_common.py``.

``bool`` is an ``int`` subclass in Python; ``True`` is never accepted as a count.
"""

from __future__ import annotations


def is_int(v: object) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(v, int) and not isinstance(v, bool)


def check_positive_int(name: str, v: object, *, allow_none: bool = False) -> int | None:
    """``v`` if it is an int >= 1 (or ``None`` when allowed), else ``ValueError``."""
    if v is None and allow_none:
        return None
    if not is_int(v) or v < 1:
        raise ValueError(f"{name} must be an int >= 1{' or None' if allow_none else ''}, got {v!r}")
    return v


def check_int_in(name: str, v: object, low: int, high: int, high_label: str | None = None) -> int:
    """``v`` if it is an int in ``[low, high]``, else ``ValueError`` (``high_label`` names the
    bound, e.g. ``"num_experts=8"``)."""
    if not is_int(v) or not low <= v <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high_label or high}], got {v!r}")
    return v


def check_positive_number(name: str, v: object, *, allow_none: bool = False) -> float | None:
    """``float(v)`` if it is a number > 0 (or ``None`` when allowed), else ``ValueError``."""
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ValueError(f"{name} must be a number > 0{' or None' if allow_none else ''}, got {v!r}")
    return float(v)


def check_non_negative(name: str, v: object) -> float:
    """``float(v)`` if it is a number >= 0 (NaN is not), else ``ValueError``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
        raise ValueError(f"{name} must be >= 0, got {v!r}")
    return float(v)
