"""A rendered picture and the one way gradwatch turns a matplotlib figure into PNG bytes (shared by the maps
of :mod:`~gradwatch.sinks.tensorboard.pictures` and the health card of :mod:`~gradwatch.sinks.tensorboard._card`;
numpy-free, matplotlib only through the figure it is given, so the drawing child can import it)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

__all__ = ["Picture", "to_png"]


@dataclass
class Picture:
    """One rendered picture: its name (``grad_to_weight``, ``skip_share``, ``profile``, ``health``) and PNG bytes."""

    name: str
    png: bytes
    width: int
    height: int


def to_png(fig: Any, name: str) -> Picture:
    """``fig`` (a matplotlib Figure) as a :class:`Picture` named ``name``."""
    buf = io.BytesIO()
    # zlib level 1: a third of level 6's time for ~1.3x the bytes (the PNG encoder was ~10% of a drawing)
    fig.savefig(buf, format="png", pil_kwargs={"compress_level": 1})
    w, h = (int(round(v)) for v in fig.get_size_inches() * fig.dpi)
    return Picture(name, buf.getvalue(), w, h)
