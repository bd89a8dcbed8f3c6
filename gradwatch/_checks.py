"""Argument checks shared by every option gradwatch takes, with one rule: TypeError for a wrong type,
ValueError for a wrong value, never a silent coercion (``True`` is not an int here, ``"3"`` is not a number).
A leaf module."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from typing import Any

from torch import nn

__all__ = [
    "check_int", "check_number", "check_fraction", "check_bool", "check_choice", "check_str", "check_prefix",
    "check_patterns", "check_types", "check_modules", "Pattern", "GRANULARITIES",
]

#: A layer-name pattern: a glob string (``fnmatch``) or a compiled regex.
Pattern = str | re.Pattern
#: Values of ``granularity``.
GRANULARITIES = ("layer", "parameter")


def _who(name: str, owner: str) -> str:
    return f"{owner}: {name}" if owner else name


def check_int(value: Any, name: str, *, minimum: int | None = None, allow_none: bool = False, owner: str = "") -> Any:
    """``value`` as given when it is an int (not a bool) ``>= minimum``; None passes when ``allow_none``."""
    if value is None and allow_none:
        return None
    what = "an int" + (f" >= {minimum}" if minimum is not None else "") + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{_who(name, owner)} must be {what}, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{_who(name, owner)} must be {what}, got {value}")
    return value


def check_number(value: Any, name: str, *, positive: bool = True, allow_none: bool = False, owner: str = "") -> Any:
    """``value`` as a float when it is an int or float (not a bool), ``> 0`` when ``positive``."""
    if value is None and allow_none:
        return None
    what = "a number" + (" > 0" if positive else "") + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{_who(name, owner)} must be {what}, got {type(value).__name__}")
    if positive and not value > 0:
        raise ValueError(f"{_who(name, owner)} must be {what}, got {value!r}")
    return float(value)


def check_fraction(value: Any, name: str, *, owner: str = "") -> float:
    """``value`` as a float in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{_who(name, owner)} must be a number in (0, 1], got {type(value).__name__}")
    if not 0 < value <= 1:
        raise ValueError(f"{_who(name, owner)} must be in (0, 1], got {value!r}")
    return float(value)


def check_bool(value: Any, name: str, *, allow_none: bool = False, owner: str = "") -> Any:
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        raise TypeError(f"{_who(name, owner)} must be a bool{' or None' if allow_none else ''}, "
                        f"got {type(value).__name__}")
    return value


def check_str(value: Any, name: str, *, owner: str = "") -> str:
    if not isinstance(value, str):
        raise TypeError(f"{_who(name, owner)} must be a str, got {type(value).__name__}")
    return value


def check_prefix(value: Any, name: str = "prefix", *, owner: str = "") -> str:
    """A tag namespace: a str without ``/`` (TensorBoard groups cards by the text before the first ``/``; the
    namespace names those groups: ``gradwatch``, ``gradwatch.layers``, ...)."""
    check_str(value, name, owner=owner)
    if "/" in value:
        raise ValueError(f"{_who(name, owner)} must not contain '/' (it names the sections before the first '/' of "
                         f"every tag: 'gradwatch', or '' for none), got {value!r}")
    return value


def check_choice(value: Any, name: str, choices: Collection[str], *, owner: str = "") -> str:
    """``value`` when it is one of ``choices`` (strings)."""
    if not isinstance(value, str):
        raise TypeError(f"{_who(name, owner)} must be one of {tuple(choices)}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{_who(name, owner)} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_patterns(value: Any, name: str) -> tuple[Pattern, ...]:
    """Glob strings or compiled regexes: one, or an iterable of them; None for none."""
    if value is None:
        return ()
    if isinstance(value, (str, re.Pattern)):
        return (value,)
    if not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a glob string, a compiled regex or a list of them, got {type(value).__name__}")
    out = tuple(value)
    for v in out:
        if not isinstance(v, (str, re.Pattern)):
            raise TypeError(f"{name} entries must be glob strings or compiled regexes, got {type(v).__name__}")
    return out


def check_types(value: Any, name: str) -> tuple[type, ...]:
    """``nn.Module`` subclasses: one, or an iterable of them; None for none."""
    if value is None:
        return ()
    if isinstance(value, type):
        value = (value,)
    if not isinstance(value, Iterable):
        raise TypeError(f"{name} must be an nn.Module subclass or a list of them, got {type(value).__name__}")
    out = tuple(value)
    for v in out:
        if not (isinstance(v, type) and issubclass(v, nn.Module)):
            raise TypeError(f"{name} entries must be nn.Module subclasses, got {v!r}")
    return out


def check_modules(value: Any, name: str) -> str | tuple[nn.Module, ...] | None:
    """``"auto"``, None, or an iterable of modules (read once, kept as a tuple)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"{name} must be 'auto', None or a list of modules, got {value!r}")
        return value
    if isinstance(value, nn.Module):
        raise TypeError(f"{name} must be 'auto', None or a list of modules; wrap a single module in a list")
    if not isinstance(value, Iterable):
        raise TypeError(f"{name} must be 'auto', None or a list of modules, got {type(value).__name__}")
    mods = tuple(value)
    for m in mods:
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name} must hold nn.Module instances, got {type(m).__name__}")
    return mods
