"""A TensorBoard link whose first screen shows your own charts next to gradwatch's health card.

TensorBoard's Time Series opens only the first two tag groups, in its sort order. gradwatch's health group
(``_gradwatch``) sorts before lowercase names, so it is one of them; in a Lightning run the other is
Lightning's ``epoch``, which Lightning writes at every logging step, and ``train_loss`` is a closed group
below the fold at 1600 x 1000. Renaming the user's or Lightning's tags is not gradwatch's to do. TensorBoard
reads pinned cards from its URL (``?pinnedCards=[{"plugin":"scalars","tag":...}]``, its own deep-link
format; pinned cards are drawn above every group), so gradwatch says, once, the link that pins the first
charts you log. Checked in headless Chromium on TensorBoard 2.21 (docs/dashboard.md, "A Lightning run").
The pins last while that page is open: TensorBoard does not save pins that came from the URL, so the plain
address shows the default first screen again (bookmark the link).
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Iterable

from ..tags import Tags

__all__ = ["MAX_PINS", "BOOKKEEPING_TAGS", "own_tags", "pin_link", "say_pins"]

#: Pinned cards in the link: one row of Time Series cards at 1600 x 1000 with the run list and settings
#: open, so the health card stays on the first screen under them.
MAX_PINS = 2
#: Tags a trainer writes for itself (Lightning's epoch counter, its ``hp_metric`` placeholder), not charts
#: of the user's.
BOOKKEEPING_TAGS = frozenset({"epoch", "step", "hp_metric"})
DEFAULT_ADDRESS = "http://localhost:6006"


def own_tags(tags: Iterable[str]) -> list[str]:
    """``tags`` without gradwatch's (any namespace: its ``zz_<ns>.*`` groups and the ``_<ns>`` health group)
    and without :data:`BOOKKEEPING_TAGS`, in their order."""
    tags = list(tags)
    namespaces = {ns for ns in map(Tags.namespace_of, tags) if ns is not None}
    health = {Tags(ns).health_group for ns in namespaces | {"gradwatch"}}
    return [t for t in tags if t not in BOOKKEEPING_TAGS and Tags.namespace_of(t) is None
            and t.split("/", 1)[0] not in health]


def pin_link(tags: Iterable[str], address: str = DEFAULT_ADDRESS, limit: int = MAX_PINS) -> str | None:
    """The Time Series link that pins the scalar cards of the first ``limit`` of ``tags``
    (``http://localhost:6006/?pinnedCards=...#timeseries``); None when there is nothing to pin."""
    pins = list(dict.fromkeys(tags))[:limit]
    if not pins:
        return None
    cards = json.dumps([{"plugin": "scalars", "tag": t} for t in pins], separators=(",", ":"))
    return f"{address.rstrip('/')}/?pinnedCards={urllib.parse.quote(cards, safe='')}#timeseries"


def say_pins(logged: Iterable[str], say: Callable[[str], None], tensorboard: bool = True) -> str | None:
    """For a trainer adapter: say (with ``say``) the :func:`pin_link` of the metric names ``logged`` this step
    and return it; ``""`` without a TensorBoard to link to; None when nothing of the user's is logged yet
    (ask again at a later step)."""
    if not tensorboard:
        return ""
    link = pin_link(own_tags(logged))
    if link is not None:
        say("gradwatch: TensorBoard opens two groups, gradwatch's health card and your first (Lightning's epoch); "
            f"this link pins your charts above them: {link} (your TensorBoard's address in place of localhost:6006)")
    return link
