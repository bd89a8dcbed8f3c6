"""JSON that strict parsers read: NaN and infinities written as the strings ``"nan"``, ``"inf"``, ``"-inf"``.

``json.dump`` writes them as bare ``NaN``/``Infinity`` tokens, which Python reads back but JavaScript,
``jq`` and most other parsers reject; the reference scripts' summaries are meant for those too.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["strict", "dump_json"]


def strict(x: Any) -> Any:
    """``x`` with every non-finite float inside dicts, lists and tuples replaced by its string."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict(v) for v in x]
    return x


def dump_json(path: str, doc: Any) -> None:
    """Write ``doc`` to ``path`` as strict, indented JSON."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(strict(doc), f, indent=1, allow_nan=False)
