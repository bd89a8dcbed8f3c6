"""Every public symbol has a docstring: each name in the ``__all__`` of a public module (its own file name does not
start with ``_``) that is a class or function, and each public method, property, classmethod and staticmethod
defined in such a class's body. Covers the core package and the framework adapters (``integrations/``)."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
from typing import Any

import pytest

import gradwatch

PENDING: set[str] = set()  # symbols allowed to lack a docstring for now: none

#: The adapters, imported as ``gradwatch.integrations.<name>``, and the frameworks each needs (any one of them).
ADAPTERS = {
    "gradwatch.integrations.lightning": ("lightning", "pytorch_lightning"),
    "gradwatch.integrations.transformers": ("transformers",),
    "gradwatch.integrations.accelerate": ("accelerate",),
}


def _core_modules() -> list[str]:
    """The public modules of the core package (a module whose own name starts with ``_`` is private)."""
    names = ["gradwatch"] + [m.name for m in pkgutil.walk_packages(gradwatch.__path__, "gradwatch.")]
    return [n for n in names if not n.rsplit(".", 1)[-1].startswith("_")]


def _documented(obj: Any) -> bool:
    return bool((getattr(obj, "__doc__", None) or "").strip())


def undocumented(module_name: str) -> list[str]:
    """``module.symbol`` (and ``module.Class.member``) for each public symbol of the module without a docstring."""
    mod = importlib.import_module(module_name)
    missing = []
    for sym in getattr(mod, "__all__", []):
        obj = getattr(mod, sym, None)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue  # a constant has no docstring of its own (a ``#:`` comment in the source)
        if not _documented(obj):
            missing.append(f"{module_name}.{sym}")
        if inspect.isclass(obj):
            for member, attr in vars(obj).items():
                if member.startswith("_"):
                    continue
                if isinstance(attr, (classmethod, staticmethod)):
                    attr = attr.__func__
                if (inspect.isfunction(attr) or isinstance(attr, property)) and not _documented(attr):
                    missing.append(f"{module_name}.{sym}.{member}")
    return [m for m in missing if m not in PENDING]


@pytest.mark.parametrize("module_name", _core_modules())
def test_core_module_documented(module_name: str) -> None:
    assert undocumented(module_name) == []


@pytest.mark.parametrize("module_name", sorted(ADAPTERS))
def test_adapter_documented(module_name: str) -> None:
    frameworks = ADAPTERS[module_name]
    present = [f for f in frameworks if importlib.util.find_spec(f) is not None]
    if not present:
        pytest.skip(f"{module_name} needs {' or '.join(frameworks)}")
    pytest.importorskip(present[0])
    assert undocumented(module_name) == []
