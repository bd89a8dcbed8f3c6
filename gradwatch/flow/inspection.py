"""The model loader behind ``gradwatch inspect``: build a model from ``MODULE:FACTORY`` and list its blocks.

Named ``inspection`` rather than ``inspect`` so that the submodule does not share its name with the
:func:`inspect` function that :mod:`gradwatch.flow` re-exports (``gradwatch.flow.inspect`` is the function).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .probe import FlowProbe
from .registry import Blocks, FlowStatus

__all__ = ["load_factory", "inspect"]


def load_factory(spec: str, kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, tuple]:
    """Build ``(model, example_args)`` from ``"package.module:factory"`` or ``"path/to/file.py:factory"``.

    ``factory`` (dotted attributes allowed) is a model, or a callable called with ``kwargs`` returning a
    model or ``(model, example_input)``. Without an example, ``example_args`` is empty.
    """
    where, sep, attr = spec.partition(":")
    if not sep or not where or not attr:
        raise ValueError(f"expected MODULE:FACTORY (e.g. gradwatch.reference.blocks:resnet), got {spec!r}")
    if where.endswith(".py") or os.sep in where:
        path = os.path.abspath(where)
        if not os.path.isfile(path):
            raise ValueError(f"no such file: {where}")
        module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"cannot load {where} as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        module = importlib.import_module(where)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{where} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, nn.Module):
        if not callable(obj):
            raise ValueError(f"{spec} is neither a model nor a callable that builds one")
        try:
            obj = obj(**(kwargs or {}))
        except Exception as err:  # the factory's own error, in one line (a bad --kwargs, most often)
            args = ", ".join(f"{k}={v!r}" for k, v in (kwargs or {}).items())
            raise ValueError(f"{spec}({args}) failed: {_one_line(err)}") from err
    elif kwargs:
        raise ValueError(f"{spec} is a model instance: it takes no arguments")
    example: tuple = ()
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], nn.Module):
        obj, ex = obj
        example = tuple(ex) if isinstance(ex, (tuple, list)) else (ex,)
    if not isinstance(obj, nn.Module):
        raise ValueError(f"{spec} returned {type(obj).__name__}, not an nn.Module")
    return obj, example


def inspect(
    spec: str, input_shape: Sequence[int] | None = None, kwargs: dict[str, Any] | None = None
) -> tuple[Blocks, FlowStatus]:
    """The blocks of the model a factory builds, found with one training-mode forward (``gradwatch inspect``).

    The example input is, in order: ``input_shape`` (``torch.randn``), what the factory returned beside the
    model, or the model's ``example_input_array`` (Lightning's convention).

    Raises:
        ValueError: no example input; the factory or the model's forward failed (a wrong ``input_shape``): the
            message names the shape and the model's own message in one line, the model's error is chained.
    """
    model, example = load_factory(spec, kwargs)
    if input_shape:
        example = (torch.randn(*input_shape),)
    if not example:
        ex = getattr(model, "example_input_array", None)
        if ex is not None:
            example = tuple(ex) if isinstance(ex, (tuple, list)) else (ex,)
    if not example:
        raise ValueError(
            "no example input: pass --input-shape (e.g. 2,3,32,32), return (model, example_input) from the "
            "factory, or give the model an example_input_array"
        )
    model.train()
    probe = FlowProbe(model, is_logging=lambda: False, step=lambda: 0, on_error=None)
    try:
        blocks = probe.discover(*example)
    except Exception as err:  # most often a wrong input shape: the model's message, in one line
        shapes = ", ".join(",".join(map(str, t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
                           for t in example)
        what = "an input of shape" if len(example) == 1 else "inputs of shapes"
        raise ValueError(f"the model's forward failed on {what} {shapes}: {_one_line(err)}") from err
    finally:
        probe.close()
    return blocks, probe.status


def _one_line(err: BaseException) -> str:
    """``Type: message``, the message's first line (torch's can run over several)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
