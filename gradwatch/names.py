"""Shared names: metric names, reserved unit names, wrapper prefixes and what "early" means.

A leaf module (imports nothing from gradwatch) so that every part can agree on these without importing each
other. Metric names are a contract: history columns, TensorBoard tags, alert rules and outside checks rely
on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "METRICS", "FLOW_METRICS", "GLOBAL_NAME", "ROOT_NAME", "WRAPPER_PREFIXES", "EARLY_FRACTION",
    "clean_name", "early_count", "short_list",
]

#: Per-layer metric names, in the order a record's columns hold them.
METRICS = ("grad_norm", "weight_norm", "grad_to_weight", "update_to_weight")
#: Per-block metric names of shortcut-path gradient flow, in the order a record's columns hold them.
FLOW_METRICS = ("grad_out", "grad_in", "skip_grad", "branch_grad", "skip_share", "transmission")

#: Name under which whole-model metrics are recorded.
GLOBAL_NAME = "_global"
#: Name of the layer formed by parameters the root module owns itself.
ROOT_NAME = "_root"

#: Name parts that wrappers insert into qualified names; removed wherever they appear.
WRAPPER_PREFIXES: tuple[str, ...] = (
    "_orig_mod.",
    "module.",
    "_fsdp_wrapped_module.",
    "_checkpoint_wrapped_module.",
)
_WRAPPER_PARTS = frozenset(p.rstrip(".") for p in WRAPPER_PREFIXES) - {"module"}

#: The share of the (weight) layers nearest the input that count as "early", in the vanishing/exploding rules,
#: the Lightning progress-bar figure and the demo alike.
EARLY_FRACTION = 0.25


def clean_name(name: str) -> str:
    """Drop wrapper parts from a qualified module or parameter name.

    >>> clean_name("_orig_mod.module.layer1.0.conv1")
    'layer1.0.conv1'
    """
    parts = name.split(".")
    # "module" is also an ordinary attribute name, so it is dropped only where DDP puts it: in front.
    kept = [p for p in parts if p not in _WRAPPER_PARTS]
    while kept and kept[0] == "module":
        kept.pop(0)
    return ".".join(kept)


def early_count(n: int, fraction: float = EARLY_FRACTION) -> int:
    """How many of ``n`` layers (ordered input first) are early: ``ceil(n * fraction)``, at least 1.

    >>> early_count(10), early_count(3), early_count(1)
    (3, 1, 1)
    """
    return max(1, math.ceil(n * fraction))


def short_list(names: Sequence[str], limit: int = 8) -> str:
    """``names`` joined with commas; past ``limit`` names, the first ``limit - 1``, an ellipsis and the last:
    ``"0, 2, … 6 (4 in all)"``. For messages (alerts, log lines)."""
    names = list(names)
    if len(names) <= limit:
        return ", ".join(names)
    head = ", ".join(names[:max(limit - 1, 1)])
    return f"{head}, … {names[-1]} ({len(names)} in all)"
